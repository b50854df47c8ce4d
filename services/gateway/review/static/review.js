// The review app works without scripts (plain forms, typed box corners); this adds what a
// mouse or the keyboard makes quicker. No inline handlers: the page's CSP allows none.
"use strict";

// -- the cell gallery from the keyboard -------------------------------------------------------
// On a focused cell: arrow keys / Home / End move, Space selects (the checkbox's own key),
// Enter applies the chosen label to the selected cells (the focused one when none is selected),
// A labels them as an artefact (ART), L jumps to the label list (Enter there applies),
// Escape clears the selection.
const galleryForm = document.querySelector("form.relabel");

function galleryCells() {
  return Array.from(document.querySelectorAll('form.relabel input[name="cell"]:not([disabled])'));
}

function applyLabel(code, focused) {
  if (!galleryForm) return;
  const select = galleryForm.querySelector('select[name="code"]');
  if (!select) return;
  if (code) select.value = code;
  if (!galleryCells().some((box) => box.checked) && focused) focused.checked = true;
  if (galleryCells().some((box) => box.checked)) galleryForm.requestSubmit();
}

document.addEventListener("keydown", (event) => {
  const el = document.activeElement;
  if (!el || event.altKey || event.ctrlKey || event.metaKey) return;
  if (el.id === "code" && event.key === "Enter") {
    event.preventDefault();
    applyLabel(null, null);
    return;
  }
  if (el.name !== "cell") return;
  const all = galleryCells();
  const i = all.indexOf(el);
  const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[event.key];
  let target = null;
  if (step) target = all[i + step];
  else if (event.key === "Home") target = all[0];
  else if (event.key === "End") target = all[all.length - 1];
  if (target) {
    target.focus();
    event.preventDefault();
    return;
  }
  const key = event.key.toLowerCase();
  if (event.key === "Enter") {
    event.preventDefault();
    applyLabel(null, el);
  } else if (key === "a") {
    event.preventDefault();
    applyLabel("ART", el);
  } else if (key === "l") {
    event.preventDefault();
    document.getElementById("code")?.focus();
  } else if (event.key === "Escape") {
    all.forEach((box) => { box.checked = false; });
  }
});

// -- type and confidence on hover -------------------------------------------------------------
const tip = document.getElementById("tip");
if (tip) {
  document.addEventListener("pointerover", (event) => {
    const target = event.target.closest ? event.target.closest("[data-tip]") : null;
    if (!target) { tip.hidden = true; return; }
    tip.textContent = target.getAttribute("data-tip");
    tip.hidden = false;
  });
  document.addEventListener("pointermove", (event) => {
    if (tip.hidden) return;
    const x = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 4);
    tip.style.left = `${x}px`;
    tip.style.top = `${event.clientY + 16}px`;
  });
}

// -- the occlusion heatmap toggle -------------------------------------------------------------
const heatToggle = document.getElementById("heatmap-toggle");
if (heatToggle) {
  const show = () => {
    const on = heatToggle.checked;
    document.querySelectorAll("svg.canvas image.heat").forEach((im) => {
      im.setAttribute("visibility", on ? "visible" : "hidden");
    });
    document.getElementById("heatmap-scale").hidden = !on;
  };
  heatToggle.addEventListener("change", show);
  show();
}

// -- draw a box on a field: fills the corner inputs of the form below it -----------------------
document.querySelectorAll("svg.canvas").forEach((svg) => {
  const form = svg.closest("figure")?.querySelector("form.draw");
  if (!form) return;
  const sketch = svg.querySelector("rect.sketch");
  const width = Number(svg.dataset.width);
  const height = Number(svg.dataset.height);
  let start = null;
  const point = (event) => {
    const p = new DOMPoint(event.clientX, event.clientY).matrixTransform(svg.getScreenCTM().inverse());
    return { x: Math.max(0, Math.min(width, p.x)), y: Math.max(0, Math.min(height, p.y)) };
  };
  const box = (a, b) => [Math.min(a.x, b.x), Math.min(a.y, b.y), Math.max(a.x, b.x), Math.max(a.y, b.y)];
  const drawSketch = ([x1, y1, x2, y2]) => {
    sketch.setAttribute("x", x1);
    sketch.setAttribute("y", y1);
    sketch.setAttribute("width", x2 - x1);
    sketch.setAttribute("height", y2 - y1);
    sketch.setAttribute("visibility", "visible");
  };
  svg.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    start = point(event);
    svg.setPointerCapture(event.pointerId);
    event.preventDefault();
  });
  svg.addEventListener("pointermove", (event) => {
    if (start) drawSketch(box(start, point(event)));
  });
  svg.addEventListener("pointerup", (event) => {
    if (!start) return;
    const corners = box(start, point(event));
    start = null;
    drawSketch(corners);
    ["x1", "y1", "x2", "y2"].forEach((name, k) => {
      form.elements[name].value = Math.round(corners[k]);
    });
    form.querySelector('select[name="code"]').focus();
  });
  // typed corners show as the same sketch
  form.addEventListener("input", () => {
    const v = ["x1", "y1", "x2", "y2"].map((n) => Number(form.elements[n].value));
    if (v.every((n, k) => form.elements[["x1", "y1", "x2", "y2"][k]].value !== "" && Number.isFinite(n))) {
      drawSketch(box({ x: v[0], y: v[1] }, { x: v[2], y: v[3] }));
    }
  });
});

// -- a field's "boxes complete": the reviewer confirms the statement it makes -----------------
// Marking a field complete says every cell on it is boxed, which makes it a detection target
// for training; without scripts the form posts as it is.
document.querySelectorAll("form.complete-mark").forEach((form) => {
  form.addEventListener("submit", (event) => {
    const ask = event.submitter?.dataset.confirm;
    if (ask && !window.confirm(ask)) event.preventDefault();
  });
});
