//! wgpu-ema in a browser tab (WebGPU, wasm32): the linear model of TensorFlow's EMA article
//! trained on the GPU, the held-out loss of the raw and the EMA weights reported live, the
//! schedule changeable mid-run, checkpoints downloaded and loaded as bytes; and a self-check of
//! the GPU EMA against the CPU reference, which the headless-browser test in CI runs.
//!
//! Build and serve: `bash examples/web/serve` (README, "The web").

use std::cell::RefCell;
use std::rc::Rc;

use wasm_bindgen::prelude::*;
use wgpu_ema::Schedule;

mod check;
mod fused;
mod layouts;
#[path = "../../shared/linear.rs"]
#[allow(dead_code)]
mod linear;
mod offload;
mod train;

use train::Trainer;

type Error = Box<dyn std::error::Error>;

/// The error for the page, with its causes (a parser's own error is the crate error's source,
/// not part of its message).
fn js(e: Error) -> JsError {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    JsError::new(&text)
}

/// The schedule the page's controls name: `kind` is `tf`, `constant`, `warmup` or `power`, and
/// `value` the decay (the largest decay for `warmup`) or, for `power`, EDM2's `sigma_rel`.
fn schedule(kind: &str, value: f64) -> Result<Schedule, Error> {
    let s = match kind {
        "tf" => Schedule::tf(value),
        "constant" => Schedule::constant(value),
        // timm's and diffusers' warmup: 1 - (1 + n)^(-2/3), capped.
        "warmup" => Schedule::warmup(1.0, 2.0 / 3.0, value),
        "power" => Schedule::power_sigma_rel(value)?,
        other => return Err(format!("unknown schedule {other:?}").into()),
    };
    s.validate()?;
    Ok(s)
}

/// The training run behind the page. Methods that read the GPU return promises; the state is
/// shared with them, never borrowed across an `await`.
#[wasm_bindgen]
pub struct Demo {
    inner: Rc<RefCell<Trainer>>,
}

#[wasm_bindgen]
impl Demo {
    /// Opens the browser's WebGPU adapter and sets up the model with the given schedule.
    pub async fn create(kind: String, value: f64) -> Result<Demo, JsError> {
        console_error_panic_hook::set_once();
        let s = schedule(&kind, value).map_err(js)?;
        let t = Trainer::new(s).await.map_err(js)?;
        Ok(Demo {
            inner: Rc::new(RefCell::new(t)),
        })
    }

    /// The adapter and its backend.
    pub fn adapter(&self) -> String {
        let t = self.inner.borrow();
        let info = t.ctx.info();
        // Browsers may hide the adapter's description from pages.
        let name = if info.name.is_empty() {
            "(name hidden by the browser)"
        } else {
            &info.name
        };
        let kind = if info.device_type == wgpu_ema::wgpu::DeviceType::Cpu {
            ", a software fallback adapter"
        } else {
            ""
        };
        format!("{name} ({:?}{kind})", info.backend)
    }

    /// True when the per-step `alpha` is an immediate; WebGPU has none, so false: the
    /// uniform ring.
    pub fn uses_immediates(&self) -> bool {
        self.inner.borrow().ema().uses_immediates()
    }

    /// Steps trained (the EMA's `num_updates`).
    pub fn step(&self) -> f64 {
        self.inner.borrow().global() as f64
    }

    /// The decay of the last update (of the next, before any).
    pub fn decay(&self) -> f64 {
        let t = self.inner.borrow();
        let n = t.global().max(1);
        t.ema().schedule().decay(n).unwrap_or(f64::NAN)
    }

    /// The schedule in force, as checkpoints record it.
    pub fn schedule(&self) -> String {
        self.inner.borrow().ema().schedule().describe()
    }

    /// Changes the schedule from the next step on, keeping the shadows.
    pub fn set_schedule(&self, kind: &str, value: f64) -> Result<(), JsError> {
        let s = schedule(kind, value).map_err(js)?;
        self.inner.borrow_mut().set_schedule(s).map_err(js)
    }

    /// Back to step 0.
    pub fn reset(&self) -> Result<(), JsError> {
        self.inner.borrow_mut().reset().map_err(js)
    }

    /// Trains `steps` steps in one submit; resolves to a `Float32Array` of the held-out loss
    /// before each step, raw and EMA interleaved.
    pub fn train(&self, steps: u32) -> js_sys::Promise {
        let started = self.inner.borrow_mut().train(steps);
        wasm_bindgen_futures::future_to_promise(async move {
            let losses = started.map_err(js)?.await.map_err(js)?;
            Ok(js_sys::Float32Array::from(&losses[..]).into())
        })
    }

    /// The EMA weights under the plain names, as safetensors bytes (a `Uint8Array`).
    pub fn export_ema(&self) -> js_sys::Promise {
        let started = self.inner.borrow().export();
        wasm_bindgen_futures::future_to_promise(async move {
            let bytes = started.map_err(js)?.await.map_err(js)?;
            Ok(js_sys::Uint8Array::from(&bytes[..]).into())
        })
    }

    /// A training checkpoint (shadows, weights, momentum, counter) as safetensors bytes.
    pub fn checkpoint(&self) -> js_sys::Promise {
        let started = self.inner.borrow().checkpoint();
        wasm_bindgen_futures::future_to_promise(async move {
            let bytes = started.map_err(js)?.await.map_err(js)?;
            Ok(js_sys::Uint8Array::from(&bytes[..]).into())
        })
    }

    /// Resumes from a training checkpoint's bytes; returns its step.
    pub fn restore(&self, bytes: Vec<u8>) -> Result<f64, JsError> {
        let step = self.inner.borrow_mut().restore(bytes).map_err(js)?;
        Ok(step as f64)
    }
}

/// The self-check (see `check`): resolves to its report as a JSON string.
#[wasm_bindgen]
pub async fn self_check(steps: u32, per_submit: u32) -> Result<String, JsError> {
    console_error_panic_hook::set_once();
    let report = check::run(steps, per_submit).await.map_err(js)?;
    Ok(report.to_string())
}
