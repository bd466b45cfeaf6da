#!/usr/bin/env python3
"""The web demo in a real browser: serves examples/web/www on 127.0.0.1, drives headless
Chromium through chromedriver (WebDriver over HTTP, Python's standard library only) with WebGPU
on SwiftShader, and checks what the page publishes in window.wgpuEmaResult:

- the self-check: the GPU's shadows after N steps against the f64 reference and the CPU's f32
  path, computed in the same tab (tolerances stated by the page), the uniform ring used (WebGPU
  has no immediates), a checkpoint round trip through bytes, the EMA fused into an SGD shader
  of the page's own bit for bit the separate pass, offloaded shadows (host update in the
  map callbacks) against the GPU's;
- the training run: the losses, the EMA download, the checkpoint download loaded back, and
  the same checkpoint truncated or with a bit flipped refused with a message.

Saves a screenshot of the page (OUT/page.png) for people to look at.

    python3 .ci/web_check.py WWW_DIR OUT_DIR [--check N] [--steps N] [--timeout S]
"""
import argparse
import base64
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


# What the self-check must reach (see the comparison below).
REL_TOL = 1e-5
ULPS_TOL = 4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(method, url, body=None, timeout=120):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)["value"]
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {url}: {e.code} {e.read().decode(errors='replace')[:2000]}")


def wait_for(url, what, seconds=30):
    end = time.time() + seconds
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except Exception:
            time.sleep(0.2)
    sys.exit(f"{what} did not come up on {url}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("www")
    ap.add_argument("out")
    ap.add_argument("--check", type=int, default=48)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)

    procs = []
    http_port, drv_port = free_port(), free_port()
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", a.www,
         str(http_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    procs.append(subprocess.Popen(
        ["chromedriver", f"--port={drv_port}"], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL))
    base = f"http://127.0.0.1:{drv_port}"
    page = f"http://127.0.0.1:{http_port}/?check={a.check}&steps={a.steps}"
    profile = tempfile.mkdtemp(prefix="wgpu-ema-chromium-")
    sid, console = None, []
    try:
        wait_for(f"http://127.0.0.1:{http_port}/index.html", "the page server")
        wait_for(f"{base}/status", "chromedriver")
        args = [
            "--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
            # WebGPU on Chromium's own software Vulkan (SwiftShader): no GPU needed.
            "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader",
            # This machine's network is closed: no background connections.
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-quic", f"--user-data-dir={profile}",
            "--window-size=1000,1100",
        ]
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": a.chromium, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}}
        sid = call("POST", f"{base}/session", caps)["sessionId"]
        s = f"{base}/session/{sid}"
        call("POST", f"{s}/url", {"url": page})
        print(f"page: {page}")
        end = time.time() + a.timeout
        result, last_print = None, 0
        while time.time() < end:
            result = call("POST", f"{s}/execute/sync",
                          {"script": "return window.wgpuEmaResult || null", "args": []})
            if result is not None:
                break
            if time.time() - last_print > 15:
                status = call("POST", f"{s}/execute/sync", {"script":
                    "return [document.getElementById('status').textContent, "
                    "document.getElementById('stats').textContent, "
                    "document.getElementById('check').textContent.split('\\n')[0]].join(' | ')",
                    "args": []})
                print(f"  {int(a.timeout - (end - time.time()))}s: {status}", flush=True)
                last_print = time.time()
            time.sleep(1)
        shot = call("GET", f"{s}/screenshot")
        with open(os.path.join(a.out, "page.png"), "wb") as f:
            f.write(base64.b64decode(shot))
        print(f"screenshot: {os.path.join(a.out, 'page.png')}")
        try:
            console = call("POST", f"{s}/se/log", {"type": "browser"})
        except Exception as e:
            console = []
            print(f"  (no console log: {e})")
        for entry in console:
            print(f"  console: {entry.get('level')}: {entry.get('message')}")
    finally:
        if sid:
            try:
                call("DELETE", f"{base}/session/{sid}")
            except Exception:
                pass
        for p in procs:
            p.terminate()

    if result is None:
        sys.exit(f"FAIL: the page published no result within {a.timeout}s")
    # WebGPU reports what it refuses (validation, lost devices) on the console, even where the
    # results still look right: any error there fails the check.
    console_errors = [
        e.get("message", "") for e in console
        if e.get("level") == "SEVERE"
        or any(k in e.get("message", "") for k in ("Invalid", "invalid", "WebGPU", "While "))
    ]
    with open(os.path.join(a.out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    failures = [f"console: {m[:300]}" for m in console_errors]
    if "error" in result:
        failures.append(f"the page failed: {result['error']}")
    else:
        c = result.get("check") or {}
        if not c.get("pass"):
            failures.append("the self-check did not pass")
        if c.get("uses_immediates") or result.get("uses_immediates"):
            failures.append("immediates used: WebGPU has none, the uniform ring must carry alpha")
        # The tolerances are the checker's, not the page's: a page that loosened its own would
        # still fail here. 1e-5 relative to max(1, |f64|) and 4 ulps against the CPU's f32 path
        # (SwiftShader measured 7.2e-8 and 0 ulps).
        if not (c.get("max_rel_err_vs_f64", math.inf) <= REL_TOL):
            failures.append("GPU shadows differ from the f64 reference beyond the tolerance")
        if not (c.get("max_ulps_vs_cpu_f32", math.inf) <= ULPS_TOL):
            failures.append("GPU shadows differ from the CPU f32 path beyond the tolerance")
        if not c.get("user_buffers_pass"):
            failures.append("tensors in user buffers (odd offsets, bf16) differ from f64")
        if not c.get("compensated_pass"):
            failures.append("compensated shadows or their Kahan terms differ from the CPU's")
        if not c.get("fused_pass"):
            failures.append("the EMA fused into an optimizer shader differs from the separate pass")
        if not c.get("offload_pass"):
            failures.append("offloaded shadows (host update in the map callbacks) differ from the GPU's")
        if not c.get("failed_readback_pass"):
            failures.append("a readback of a destroyed buffer did not fail (zeros instead?)")
        if not c.get("swap_round_trip"):
            failures.append("swapping the EMA weights into the parameters and back was not exact")
        if not c.get("checkpoint_round_trip"):
            failures.append("the checkpoint bytes did not load back to the GPU's shadows")
        if result.get("steps") != a.steps or result.get("step") != a.steps:
            failures.append(f"trained {result.get('steps')} steps, asked {a.steps}")
        if result.get("restored_step") != result.get("step"):
            failures.append("the downloaded checkpoint did not restore the step")
        refusals = result.get("refusals") or []
        if len(refusals) != 2 or not all(isinstance(r, str) and r for r in refusals):
            failures.append(f"a truncated or bit-flipped checkpoint was not refused: {refusals}")
        # Each refusal names its damage: the cut file as not a valid file, the flipped bit
        # (in the data) by its checksum.
        elif "not a valid safetensors file" not in refusals[0] or "checksum" not in refusals[1]:
            failures.append(f"the refusals do not name the damage: {refusals}")
        if not result.get("export_bytes"):
            failures.append("the EMA download is empty")
        losses = [result.get(k) for k in ("first_loss", "raw_loss", "ema_loss")]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses):
            failures.append(f"losses not finite: {losses}")
        elif not result["ema_loss"] < result["first_loss"]:
            failures.append("the EMA weights did not improve on the initial weights")
    if failures:
        sys.exit("FAIL:\n  " + "\n  ".join(failures))
    print("web check passed")


if __name__ == "__main__":
    main()
