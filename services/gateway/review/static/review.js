// The review app works without scripts (plain forms); this adds keyboard selection in the
// gallery: Space toggles the focused cell (the checkbox's own behaviour), and the arrow
// keys move between cells, so a reviewer can relabel without a mouse.
document.addEventListener("keydown", (event) => {
  const box = document.activeElement;
  if (!box || box.name !== "cell") return;
  const all = Array.from(document.querySelectorAll('input[name="cell"]'));
  const i = all.indexOf(box);
  const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[event.key];
  if (step && all[i + step]) {
    all[i + step].focus();
    event.preventDefault();
  }
});
