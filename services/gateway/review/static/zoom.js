// Deep zoom over a slide case: OpenSeadragon (vendored, static/vendor/openseadragon) on the
// gateway's DZI tiles, the selected regions drawn over it as numbered links to their cells.
// Without scripts the page keeps the thumbnail and the numbered list of regions.
"use strict";

(function () {
  const host = document.getElementById("slide-viewer");
  if (!host || typeof OpenSeadragon === "undefined") return;
  const viewer = OpenSeadragon({
    element: host,
    tileSources: host.dataset.dzi,
    showNavigationControl: false, // the page's own buttons: no button images to vendor
    showNavigator: false,
    gestureSettingsMouse: { clickToZoom: false },
    visibilityRatio: 0.5,
    maxZoomPixelRatio: 2,
  });
  const marks = Array.from(document.querySelectorAll(".region-links .region-mark"));

  viewer.addHandler("open", () => {
    for (const mark of marks) {
      const d = mark.dataset;
      const rect = viewer.viewport.imageToViewportRectangle(+d.x, +d.y, +d.w, +d.h);
      mark.classList.add("on-slide");
      viewer.addOverlay({ element: mark, location: rect });
      // the viewer's drag tracking swallows plain clicks on its overlays: follow the link here
      new OpenSeadragon.MouseTracker({
        element: mark,
        clickHandler: (event) => {
          if (event.quick) window.location.hash = mark.hash;
        },
      });
    }
    host.dataset.ready = "true";
  });
  viewer.addHandler("open-failed", () => {
    host.dataset.ready = "failed";
    host.classList.add("failed");
    host.textContent = "The slide cannot be read now (moved or expired): the thumbnail shows the regions.";
  });

  for (const button of document.querySelectorAll(".zoom-tools [data-zoom]")) {
    button.addEventListener("click", () => {
      const how = button.dataset.zoom;
      if (how === "home") viewer.viewport.goHome();
      else viewer.viewport.zoomBy(how === "in" ? 1.6 : 1 / 1.6);
      viewer.viewport.applyConstraints();
    });
  }
})();
