"""The FHIR R4B report parses back with fhir.resources and carries the AI labels."""

from __future__ import annotations

from tests.gateway.conftest import files, meta, png, wait_status


def test_fhir_bundle_parses_back(gateway):
    from fhir.resources.R4B.bundle import Bundle

    client, _, keys = gateway()
    with client:
        r = client.post(
            "/v1/analyses",
            files=files(png(seed=5), metadata=meta(options={"explain": True})),
            headers=keys["lis"],
        )
        aid = r.json()["id"]
        result = wait_status(client.get, aid, keys["lis"])["result"]
        rep = client.get(
            f"/v1/analyses/{aid}/report", params={"format": "fhir"}, headers=keys["lis"]
        )
    assert rep.status_code == 200
    assert rep.headers["content-type"].startswith("application/fhir+json")
    bundle = Bundle.model_validate(rep.json())
    by_type: dict[str, list] = {}
    for e in bundle.entry:
        by_type.setdefault(e.resource.get_resource_type(), []).append(e.resource)
    (report,) = by_type["DiagnosticReport"]
    (device,) = by_type["Device"]
    (prov,) = by_type["Provenance"]
    assert report.status == "preliminary"  # AI only: final comes with the sign-out
    assert {r.reference for r in report.result} <= {e.fullUrl for e in bundle.entry}
    for res in [report, device, *by_type["Observation"], *by_type["Media"]]:
        assert any(c.code == "AIAST" for c in res.meta.security)
    obs = {o.code.coding[0].code: o for o in by_type["Observation"]}
    assert float(obs["p-aml"].valueQuantity.value) == round(result["p_aml"], 6)
    assert float(obs["p-npm1-mutated"].valueQuantity.value) == round(result["p_npm1"], 6)
    raw = next(
        e["resource"]
        for e in rep.json()["entry"]
        if e["resource"].get("code", {}).get("text", "").startswith("Probability of acute")
    )
    assert isinstance(raw["valueQuantity"]["value"], float)  # a JSON number, not a string
    assert float(obs["blast-percent"].valueQuantity.value) == round(result["blast_percent"], 4)
    for d in result["differential"]:
        assert obs[f"count-{d['code']}"].valueInteger == d["count"]
    versions = {v.type.text: v.value for v in device.version}
    assert versions == {s: v["version"] for s, v in result["model_versions"].items()}
    assert all(o.device.reference == obs["p-aml"].device.reference for o in obs.values())
    assert prov.agent[0].who.reference == obs["p-aml"].device.reference
    urls = [m.content.url for m in by_type["Media"]]
    assert any(u.endswith(f"/v1/analyses/{aid}/images/0/heatmap.png") for u in urls)
    assert len(report.media) == len(by_type["Media"]) == 2
