// The demo page: drives the wasm module (examples/web/src), draws the held-out loss of the
// raw and the EMA weights, and wires the controls. With ?check=N it first runs the self-check
// (N EMA steps on the GPU against the CPU reference, in this tab); with ?steps=N it stops after
// N training steps and publishes everything in window.wgpuEmaResult (what CI's headless
// browser reads).
import init, { Demo, self_check } from "./pkg/wgpu_ema_web.js";

const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
const checkSteps = Number(query.get("check") || 0);
const stopAt = Number(query.get("steps") || 0);
const NOISE_FLOOR = 0.25; // the targets' noise is 0.5: no weights do better on held-out data

const raw = [];
const ema = [];
let demo = null;
let running = true;
let busy = false;
let rate = 0;

function fail(e) {
  const text = String(e && e.message ? e.message : e);
  $("error").textContent = text;
  running = false;
  window.wgpuEmaResult = { error: text };
  document.title = "FAIL";
}

function draw() {
  const c = $("plot");
  const g = c.getContext("2d");
  const W = c.width, H = c.height, L = 62, R = 14, T = 14, B = 40;
  g.clearRect(0, 0, W, H);
  g.font = "13px system-ui, sans-serif";
  const n = raw.length;
  let lo = NOISE_FLOOR * 0.8, hi = 1;
  for (let i = 0; i < n; i++) hi = Math.max(hi, raw[i], ema[i]);
  hi = Math.min(hi, 1e4);
  const ly = (v) => Math.log10(Math.min(Math.max(v, lo), hi));
  const y = (v) => T + (H - T - B) * (ly(hi) - ly(v)) / (ly(hi) - ly(lo));
  const x = (i) => L + (W - L - R) * (n > 1 ? i / (n - 1) : 0);
  // Axes and decade grid.
  g.strokeStyle = "#ddd"; g.fillStyle = "#555"; g.lineWidth = 1;
  for (let d = Math.ceil(Math.log10(lo)); d <= Math.floor(Math.log10(hi)); d++) {
    const yy = y(10 ** d);
    g.beginPath(); g.moveTo(L, yy); g.lineTo(W - R, yy); g.stroke();
    g.fillText(String(10 ** d), 8, yy + 4);
  }
  g.fillText("held-out MSE (log)", L + 6, T + 12);
  g.fillText(`step ${n}`, W - R - 80, H - 12);
  g.fillText("0", L, H - 12);
  // The noise floor.
  g.setLineDash([5, 4]); g.strokeStyle = "#888";
  g.beginPath(); g.moveTo(L, y(NOISE_FLOOR)); g.lineTo(W - R, y(NOISE_FLOOR)); g.stroke();
  g.setLineDash([]);
  g.fillText("noise floor", L + 6, y(NOISE_FLOOR) + 16);
  // The curves, one point per pixel column at most.
  const series = [[raw, "#e8710a", "raw weights"], [ema, "#1a73e8", "EMA weights"]];
  const stride = Math.max(1, Math.floor(n / (W - L - R)));
  series.forEach(([s, color, name], k) => {
    g.strokeStyle = color; g.lineWidth = 2; g.beginPath();
    for (let i = 0; i < n; i += stride) {
      if (i === 0) g.moveTo(x(i), y(s[i])); else g.lineTo(x(i), y(s[i]));
    }
    g.stroke();
    g.fillStyle = color; g.fillRect(L + 180 + 140 * k, T + 3, 18, 4);
    g.fillStyle = "#333"; g.fillText(name, L + 204 + 140 * k, T + 10);
  });
}

function stats() {
  const n = raw.length;
  const last = (s) => (n ? s[n - 1].toPrecision(4) : "-");
  $("stats").textContent =
    `step ${demo.step()}   decay ${demo.decay().toFixed(6)}   raw loss ${last(raw)}   ` +
    `EMA loss ${last(ema)}   ${rate.toFixed(0)} steps/s   ${demo.schedule()}`;
}

async function frame() {
  if (!running || busy) return;
  busy = true;
  try {
    let want = Number($("speed").value);
    if (stopAt) want = Math.min(want * 10, stopAt - raw.length);
    const t0 = performance.now();
    const losses = await demo.train(want);
    const dt = (performance.now() - t0) / 1000;
    rate = 0.8 * rate + 0.2 * (want / Math.max(dt, 1e-3));
    for (let i = 0; i < losses.length; i += 2) { raw.push(losses[i]); ema.push(losses[i + 1]); }
    draw();
    stats();
    if (stopAt && raw.length >= stopAt) {
      running = false;
      await finish();
    }
  } catch (e) {
    fail(e);
  }
  busy = false;
  if (running) (stopAt ? setTimeout : requestAnimationFrame)(frame);
}

// The end of a scripted run: the downloads the buttons offer, checked, then the result.
async function finish() {
  const exported = await demo.export_ema();
  const saved = await demo.checkpoint();
  const step = demo.step();
  // A damaged file is refused with a message and changes nothing.
  const refusals = [];
  const flipped = saved.slice();
  flipped[flipped.length - 3] ^= 0x40;
  for (const bad of [saved.slice(0, saved.length - 5), flipped]) {
    try { demo.restore(bad); refusals.push(null); } catch (e) { refusals.push(String(e.message || e)); }
  }
  const restored = demo.restore(saved);
  window.wgpuEmaResult = {
    check: window.wgpuEmaCheck || null,
    adapter: demo.adapter(),
    uses_immediates: demo.uses_immediates(),
    steps: raw.length,
    raw_loss: raw[raw.length - 1],
    ema_loss: ema[ema.length - 1],
    first_loss: raw[0],
    export_bytes: exported.length,
    checkpoint_bytes: saved.length,
    restored_step: restored,
    refusals,
    step,
  };
  document.title = window.wgpuEmaResult.check && !window.wgpuEmaResult.check.pass ? "FAIL" : "DONE";
}

function download(bytes, name) {
  const url = URL.createObjectURL(new Blob([bytes], { type: "application/octet-stream" }));
  const a = document.createElement("a");
  a.href = url; a.download = name; a.click();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

async function main() {
  if (!navigator.gpu) throw new Error("This browser has no WebGPU (navigator.gpu is missing).");
  await init();
  if (checkSteps) {
    $("check").textContent = `self-check: ${checkSteps} EMA steps on the GPU vs the CPU reference…`;
    const report = JSON.parse(await self_check(checkSteps, 8));
    window.wgpuEmaCheck = report;
    const el = $("check");
    el.className = report.pass ? "pass" : "fail";
    el.textContent =
      `self-check ${report.pass ? "PASSED" : "FAILED"}: ${report.steps} EMA steps, ` +
      `${report.steps_per_submit} per submit, ${report.emas} EMAs in one pass, on ` +
      `${report.tensors} tensors (${report.elements.toLocaleString("en")} elements), ` +
      `alpha via ${report.uses_immediates ? "immediates" : `uniform rings of ${report.ring_slots} slots`}\n` +
      `  GPU vs f64 reference: max relative error ${report.max_rel_err_vs_f64.toExponential(2)} ` +
      `(tolerance ${report.rel_tol.toExponential(0)})\n` +
      `  GPU vs CPU f32 path: ${report.max_ulps_vs_cpu_f32} ulps (tolerance ${report.ulps_tol})\n` +
      `  checkpoint bytes loaded back: ${report.checkpoint_round_trip ? "bit for bit" : "DIFFERENT"}; ` +
      `EMA swapped into the weights and back: ${report.swap_round_trip ? "bit for bit" : "DIFFERENT"}\n` +
      `  your own buffers at odd offsets, NaN between, and bf16: max relative error ` +
      `${report.user_buffers_max_rel_err_vs_f64.toExponential(2)} over ${report.user_buffers_steps} steps\n` +
      `  compensated (Kahan) at decay 0.999, ${report.compensated_steps} steps: ` +
      `${report.compensated_max_ulps_vs_cpu} ulps from the CPU's compensated path ` +
      `(Kahan terms ${report.compensated_terms_max_ulps_vs_cpu} ulps), ` +
      `relative error ${report.compensated_max_rel_err_vs_f64.toExponential(2)} vs f64`;
  }
  demo = await Demo.create($("kind").value, Number($("value").value));
  $("status").textContent =
    `adapter: ${demo.adapter()} · per-step decay via ` +
    (demo.uses_immediates() ? "immediates" : "the uniform ring (WebGPU has no immediates)");
  $("apply").onclick = () => {
    try { demo.set_schedule($("kind").value, Number($("value").value)); $("error").textContent = ""; stats(); }
    catch (e) { $("error").textContent = String(e.message || e); }
  };
  $("kind").onchange = () => { $("value").value = $("kind").value === "power" ? "0.1" : "0.999"; };
  $("pause").onclick = () => {
    running = !running;
    $("pause").textContent = running ? "pause" : "resume";
    if (running) requestAnimationFrame(frame);
  };
  $("reset").onclick = () => { demo.reset(); raw.length = 0; ema.length = 0; draw(); stats(); };
  $("export").onclick = async () => download(await demo.export_ema(), `ema-step${demo.step()}.safetensors`);
  $("save").onclick = async () => download(await demo.checkpoint(), `ckpt-${demo.step()}.safetensors`);
  $("load").onchange = async (ev) => {
    const file = ev.target.files[0];
    if (!file) return;
    try {
      const step = demo.restore(new Uint8Array(await file.arrayBuffer()));
      raw.length = 0; ema.length = 0;
      $("error").textContent = `resumed from ${file.name} at step ${step}`;
      stats();
    } catch (e) { $("error").textContent = String(e.message || e); }
  };
  stats();
  frame();
}

main().catch(fail);
