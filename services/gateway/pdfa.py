"""PDF/A-2b parts that reportlab does not write by itself: the sRGB OutputIntent and the XMP
metadata packet (pdfaid part 2, conformance B) that repeats the Info dictionary.

reportlab is not a certified PDF/A producer; with embedded fonts (the report only uses
TrueType fonts it embeds) these two catalog entries are what PDF/A-2b adds to a plain PDF of
text, vector shapes and RGB images. Checked with poppler (`pdfinfo` reads the PDF/A-2b
claim from the XMP, `pdffonts` lists every font embedded); no full validator (veraPDF) is
installable from PyPI or Debian, so no conformance certificate is claimed (docs/REPORTS.md).
"""

from __future__ import annotations

from functools import cache
from typing import Any
from xml.sax.saxutils import escape

from reportlab.pdfbase.pdfdoc import (
    PDFArray,
    PDFCatalog,
    PDFDictionary,
    PDFName,
    PDFStream,
    PDFString,
)

_XMP = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:pdfaid="http://www.aiim.org/pdfa/ns/id/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:pdf="http://ns.adobe.com/pdf/1.3/">
   <pdfaid:part>2</pdfaid:part>
   <pdfaid:conformance>B</pdfaid:conformance>
   <dc:format>application/pdf</dc:format>
   <dc:title><rdf:Alt><rdf:li xml:lang="x-default">{title}</rdf:li></rdf:Alt></dc:title>
   <dc:creator><rdf:Seq><rdf:li>{author}</rdf:li></rdf:Seq></dc:creator>
   <dc:description><rdf:Alt><rdf:li xml:lang="x-default">{subject}</rdf:li></rdf:Alt></dc:description>
   <pdf:Producer>{producer}</pdf:Producer>
   <pdf:Keywords>{keywords}</pdf:Keywords>
   <pdf:Trapped>False</pdf:Trapped>
   <xmp:CreatorTool>{creator}</xmp:CreatorTool>
   <xmp:CreateDate>{date}</xmp:CreateDate>
   <xmp:ModifyDate>{date}</xmp:ModifyDate>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>"""


@cache
def srgb_profile() -> bytes:
    """An sRGB ICC profile, built by LittleCMS through Pillow (no profile file shipped)."""
    from PIL import ImageCms

    return bytes(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())


class _Unfiltered(PDFStream):  # type: ignore[misc]  # reportlab ships no types
    """A stream written as is: PDF/A wants the XMP packet readable without decoding."""

    def __init__(self, dictionary: dict[str, Any], make: Any) -> None:
        super().__init__(PDFDictionary(dictionary))
        self._make = make

    def format(self, document: Any) -> bytes:
        content: bytes = self._make(document)
        d = PDFDictionary(dict(self.dictionary.dict))
        d["Length"] = len(content)
        return bytes(d.format(document)) + b"\nstream\n" + content + b"\nendstream\n"


def _xmp_date(document: Any) -> str:
    """The Info dictionary's CreationDate (reportlab's document time stamp) in XMP form."""
    ts = document._timeStamp
    y, mo, d, h, mi, s = ts.YMDhms
    return f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}{ts.dhh:+03d}:{ts.dmm:02d}"


def _xmp(document: Any) -> bytes:
    info = document.info
    fields = {
        k: escape(str(getattr(info, k)))
        for k in ("title", "author", "subject", "keywords", "producer", "creator")
    }
    return _XMP.format(date=_xmp_date(document), **fields).encode("utf-8")


def make_pdfa(canvas: Any) -> None:
    """Add the OutputIntent and XMP metadata to the catalog of the document `canvas` draws
    (call once, e.g. from the first page's onPage hook)."""
    document = canvas._doc
    catalog = document.Catalog
    profile = PDFStream(PDFDictionary({"N": 3}), content=srgb_profile())
    intent = PDFDictionary(
        {
            "Type": PDFName("OutputIntent"),
            "S": PDFName("GTS_PDFA1"),
            "OutputConditionIdentifier": PDFString("sRGB IEC61966-2.1"),
            "Info": PDFString("sRGB IEC61966-2.1"),
            "DestOutputProfile": document.Reference(profile),
        }
    )
    # PDFCatalog writes only the keys it lists; OutputIntents is not one of them
    keys = [*PDFCatalog.__NoDefault__, "OutputIntents"]
    catalog.__NoDefault__ = catalog.__Refs__ = keys
    catalog.OutputIntents = PDFArray([intent])
    catalog.Metadata = _Unfiltered({"Type": PDFName("Metadata"), "Subtype": PDFName("XML")}, _xmp)
