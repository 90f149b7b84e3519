// ctxedit report: each run's videos play together. The first video that has not failed (the source) leads; the
// others follow it frame for frame, each at its own frame rate, and the run's controls act on all of them.
"use strict";

const players = [...document.querySelectorAll("section.run[data-frames]")].map(player);
let active = players[0];  // the player the keys act on: the one last touched

document.addEventListener("keydown", (event) => {
  const steps = { ArrowLeft: -1, ArrowRight: 1 };
  if (!active || event.altKey || event.ctrlKey || event.metaKey || event.repeat) return;
  if (event.target.closest("button, input, select, textarea")) return;  // those keep their own keys
  if (event.key === " ") active.toggle();
  else if (event.key in steps) active.step(steps[event.key]);
  else return;
  event.preventDefault();
});

function player(section) {
  const videos = [...section.querySelectorAll("video.sync")];
  const frames = Number(section.dataset.frames);
  const control = (name) => section.querySelector("." + name);
  const [play, scrub, label, loop, sound] = ["play", "scrub", "frame", "loop", "sound"].map(control);
  const fps = (video) => Number(video.dataset.fps);
  const frameOf = (video) => video.currentTime * fps(video);
  const lead = () => videos.find((video) => !video.error);
  let tick = null;  // the pending animation frame while playing

  function show(frame) {
    scrub.value = frame;
    label.textContent = `${frame + 1} / ${frames}`;
  }

  function seek(frame) {
    frame = Math.max(0, Math.min(frames - 1, frame));
    for (const video of videos) video.currentTime = (frame + 0.5) / fps(video);  // mid-frame: no rounding down
    show(frame);
  }

  function playAll() {
    const first = lead();
    for (const video of videos) {
      video.playbackRate = Math.min(16, Math.max(1 / 16, fps(first) / fps(video)));  // the lead's frames per second
      video.play().catch(() => {});  // a pause before playback starts rejects the promise: nothing to do
    }
  }

  function start() {
    const first = lead();
    if (!first || tick !== null) return;
    if (frameOf(first) >= frames - 0.5) seek(0);
    play.textContent = "Pause";
    playAll();
    tick = requestAnimationFrame(follow);
  }

  function stop(frame) {  // every video paused on one frame: the lead's, or `frame`
    cancelAnimationFrame(tick);
    tick = null;
    play.textContent = "Play";
    for (const video of videos) video.pause();
    const first = lead();
    if (first) seek(frame ?? Math.floor(frameOf(first)));
  }

  function follow() {
    const first = lead();
    if (!first) return stop();  // every video failed
    const now = frameOf(first);
    if (first.ended || now >= frames) {
      if (!loop.checked) return stop(frames - 1);
      seek(0);
      playAll();
    } else {
      for (const video of videos) {
        const off = Math.abs(frameOf(video) - now) > 0.5;
        if (video !== first && off && !video.seeking) video.currentTime = now / fps(video);
      }
      show(Math.min(frames - 1, Math.floor(now)));
    }
    tick = requestAnimationFrame(follow);
  }

  const self = {
    toggle: () => (tick === null ? start() : stop()),
    step: (by) => stop(Number(scrub.value) + by),
  };
  play.addEventListener("click", self.toggle);
  control("back").addEventListener("click", () => self.step(-1));
  control("next").addEventListener("click", () => self.step(1));
  scrub.addEventListener("input", () => stop(Number(scrub.value)));
  sound?.addEventListener("change", () => {
    const source = section.querySelector(".tile.source video");
    if (source) source.muted = !sound.checked;
  });
  for (const kind of ["pointerdown", "focusin"]) section.addEventListener(kind, () => (active = self));
  return self;
}
