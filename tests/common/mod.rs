//! Shared by the integration tests: one device for all tests, seeded data, comparisons.
#![allow(dead_code)]

use std::sync::OnceLock;

use wgpu_ema::{wgpu, GpuContext};

/// The device all GPU tests share, or `None` (test skipped) when there is no adapter.
///
/// With `WGPU_EMA_REQUIRE_ADAPTER=1` (set by `.ci/run`) a missing adapter fails the test
/// instead, naming the packages to install.
pub fn gpu() -> Option<&'static GpuContext> {
    static CTX: OnceLock<Option<GpuContext>> = OnceLock::new();
    let ctx = CTX.get_or_init(|| match GpuContext::new() {
        Ok(c) => {
            eprintln!("GPU tests run on: {}", c.describe());
            Some(c)
        }
        Err(e) => {
            eprintln!("no GPU adapter: {e}");
            None
        }
    });
    if ctx.is_none() {
        if std::env::var("WGPU_EMA_REQUIRE_ADAPTER").as_deref() == Ok("1") {
            panic!(
                "WGPU_EMA_REQUIRE_ADAPTER=1 but no GPU adapter was found: install Mesa's \
                 software drivers (Debian: `apt-get install mesa-vulkan-drivers libvulkan1` for \
                 Vulkan, `libegl1 libegl-mesa0 libgl1-mesa-dri` for GL)"
            );
        }
        eprintln!("SKIPPED: no GPU adapter (set WGPU_EMA_REQUIRE_ADAPTER=1 to make this fail)");
    }
    ctx.as_ref()
}

/// Seeded values in [-1, 1), never all zero.
pub fn random(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| rng.f32() * 2.0 - 1.0).collect()
}

/// A buffer holding `data` at `byte_offset`, with NaN before and after it (so reading the
/// wrong elements shows), usage STORAGE | COPY_DST | COPY_SRC.
pub fn buffer_with(ctx: &GpuContext, data: &[f32], byte_offset: u64) -> wgpu::Buffer {
    let before = (byte_offset / 4) as usize;
    let mut all = vec![f32::NAN; before];
    all.extend_from_slice(data);
    all.extend(std::iter::repeat_n(f32::NAN, 7));
    let buf = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("test params"),
        size: (all.len() * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    ctx.queue.write_buffer(&buf, 0, bytemuck::cast_slice(&all));
    buf
}

/// A buffer with 0xFFFF (NaN in both formats) around the tensor at `offset`.
pub fn half_buffer(ctx: &GpuContext, bits: &[u16], offset: u64) -> wgpu::Buffer {
    let before = (offset / 2) as usize;
    let mut all = vec![0xFFFFu16; before];
    all.extend_from_slice(bits);
    all.extend([0xFFFF; 6]);
    if all.len() % 2 == 1 {
        all.push(0xFFFF);
    }
    let buf = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("half params"),
        size: (all.len() * 2) as u64,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    ctx.queue.write_buffer(&buf, 0, bytemuck::cast_slice(&all));
    buf
}

/// Overwrites `data` at `byte_offset` of `buf`.
pub fn write(ctx: &GpuContext, buf: &wgpu::Buffer, byte_offset: u64, data: &[f32]) {
    ctx.queue
        .write_buffer(buf, byte_offset, bytemuck::cast_slice(data));
}

/// Asserts `got` matches the f64 reference within `rel` of `max(1, |reference|)`; NaN fails.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs() / w.abs().max(1.0);
        assert!(
            err.is_finite() && err <= rel,
            "{what}: element {i} of {}: got {g}, want {w} (relative error {err:e} > {rel:e})",
            got.len()
        );
        if err > worst.0 {
            worst = (err, i);
        }
    }
}

/// Asserts every tensor of `specs` read back in `got` matches the reference's tensor at the
/// same position, within `rel` (as [`assert_close`]).
pub fn assert_shadows_close(
    got: &wgpu_ema::HostTensors,
    specs: &[wgpu_ema::TensorSpec],
    reference: &wgpu_ema::cpu::ReferenceEma,
    rel: f64,
) {
    for (i, s) in specs.iter().enumerate() {
        let values = got
            .try_get(&s.name)
            .unwrap_or_else(|e| panic!("{}: {e}", s.name));
        assert_close(&s.name, values, &reference.shadows()[i], rel);
    }
}

/// Distance in units in the last place between two f32.
pub fn ulps(a: f32, b: f32) -> u64 {
    let key = |x: f32| {
        let i = x.to_bits() as i32;
        (if i < 0 { i32::MIN - i } else { i }) as i64
    };
    (key(a) - key(b)).unsigned_abs()
}

/// The bit patterns of `v`: compares f32 values exactly (NaNs and signed zeros included).
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Reads a whole buffer (it needs COPY_SRC) back as u32 words.
pub fn read_words(ctx: &GpuContext, buf: &wgpu::Buffer) -> Vec<u32> {
    let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("test readback"),
        size: buf.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buf, 0, &staging, 0, buf.size());
    ctx.queue.submit(Some(enc.finish()));
    staging.map_async(wgpu::MapMode::Read, .., |r| r.expect("map"));
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("poll");
    let words = bytemuck::pod_collect_to_vec(&staging.get_mapped_range(..).expect("mapped"));
    staging.unmap();
    words
}

/// A state of two power-function EMAs with seeded shadows, no GPU needed.
pub struct Seeded {
    pub specs: Vec<wgpu_ema::TensorSpec>,
    pub t: u64,
}

impl Seeded {
    pub fn values(&self, k: usize, i: usize) -> Vec<f32> {
        random(
            self.t * 100 + i as u64 * 10 + k as u64,
            self.specs[i].numel() as usize,
        )
    }
}

impl wgpu_ema::checkpoint::EmaState for Seeded {
    fn specs(&self) -> Vec<wgpu_ema::TensorSpec> {
        self.specs.clone()
    }
    fn num_updates(&self) -> u64 {
        self.t
    }
    fn schedule(&self) -> wgpu_ema::Schedule {
        wgpu_ema::Schedule::power_sigma_rel(0.05).unwrap()
    }
    fn numerics(&self) -> wgpu_ema::Numerics {
        wgpu_ema::Numerics::Exact
    }
    fn read_shadow(&self, i: usize) -> wgpu_ema::Result<Vec<f32>> {
        Ok(self.values(0, i))
    }
    fn read_param(&self, _: usize) -> wgpu_ema::Result<Option<Vec<f32>>> {
        Ok(None)
    }
    fn ema_count(&self) -> usize {
        2
    }
    fn ema_schedule(&self, k: usize) -> Option<wgpu_ema::Schedule> {
        [0.05, 0.10]
            .get(k)
            .map(|&s| wgpu_ema::Schedule::power_sigma_rel(s).unwrap())
    }
    fn read_ema_shadow(&self, k: usize, i: usize) -> wgpu_ema::Result<Vec<f32>> {
        Ok(self.values(k, i))
    }
}

/// Asserts that `e` is a checkpoint error of `kind` (and, when given, about `tensor`).
pub fn assert_checkpoint_kind(
    e: &wgpu_ema::Error,
    kind: wgpu_ema::CheckpointErrorKind,
    tensor: Option<&str>,
) {
    match e {
        wgpu_ema::Error::Checkpoint {
            kind: k, tensor: t, ..
        } => {
            assert_eq!(*k, kind, "{e}");
            if let Some(name) = tensor {
                assert_eq!(t.as_deref(), Some(name), "{e}");
            }
        }
        other => panic!("expected a checkpoint error of kind {kind:?}, got {other}"),
    }
}

/// The largest `|got - reference|` divided by `scale`, seeing NaN: a non-finite value on either
/// side, or slices of different lengths, measure as an infinite error (`f64::max` would drop a
/// NaN and report 0, and an empty zip would report 0 too).
pub fn max_error(got: &[f32], reference: &[f64], scale: f64) -> f64 {
    if got.len() != reference.len() || !scale.is_finite() || scale <= 0.0 {
        return f64::INFINITY;
    }
    let mut worst = 0.0f64;
    for (&g, &r) in got.iter().zip(reference) {
        let e = (g as f64 - r).abs() / scale;
        if !e.is_finite() {
            return f64::INFINITY;
        }
        worst = worst.max(e);
    }
    worst
}

#[test]
fn max_error_sees_nan_and_length() {
    assert_eq!(max_error(&[1.0, 2.0], &[1.0, 2.5], 1.0), 0.5);
    assert_eq!(max_error(&[f32::NAN, 2.0], &[1.0, 2.0], 1.0), f64::INFINITY);
    assert_eq!(max_error(&[1.0], &[f64::NAN], 1.0), f64::INFINITY);
    assert_eq!(max_error(&[], &[1.0], 1.0), f64::INFINITY);
}

/// A second device on the same adapter with storage bindings capped at 128 MiB (WebGPU's
/// default, which every adapter supports), so that tests go past one binding on any GPU, not
/// only on Mesa's drivers (whose limit is 128 MiB): GPUs allow up to 4 GiB, more than a test
/// can fill.
pub fn gpu_small_bindings() -> Option<&'static GpuContext> {
    static CTX: OnceLock<Option<GpuContext>> = OnceLock::new();
    let base = gpu()?;
    CTX.get_or_init(|| {
        let mut limits = base.device.limits();
        limits.max_storage_buffer_binding_size =
            limits.max_storage_buffer_binding_size.min(128 << 20);
        let (device, queue) =
            pollster::block_on(base.adapter.request_device(&wgpu::DeviceDescriptor {
                label: Some("tests: 128 MiB bindings"),
                required_features: base.device.features(),
                required_limits: limits,
                ..Default::default()
            }))
            .expect("a second device on the test adapter");
        Some(GpuContext {
            instance: base.instance.clone(),
            adapter: base.adapter.clone(),
            device,
            queue,
        })
    })
    .as_ref()
}

/// The paper's Algorithm 1 per element in f64, with TRL's options: calls up to the burn-in
/// `tau` (and every restart) set the EMA and `theta_0` to the parameters; the other calls
/// whose count `k` past `tau` is a multiple of `every` take
/// `EMA = (1 - beta_t) EMA + beta_t theta`, `beta_t = (rho + gamma t)^(-kappa)`; the weights
/// are `EMA + (rho + gamma t)^(-eta) (theta - theta_0)` with `t` of the last update.
pub struct PaperBema {
    kappa: f64,
    eta: f64,
    rho: f64,
    gamma: f64,
    tau: u64,
    every: u64,
    restart: u64,
    pub ema: Vec<Vec<f64>>,
    theta0: Vec<Vec<f64>>,
    /// `t` of the last update; 0 after a copy.
    pub t: u64,
    /// The last call copied.
    pub copied: bool,
}

pub fn widen(v: &[Vec<f32>]) -> Vec<Vec<f64>> {
    v.iter()
        .map(|x| x.iter().map(|&y| f64::from(y)).collect())
        .collect()
}

impl PaperBema {
    pub fn new(
        b: &wgpu_ema::schedule::Bema,
        policy: &wgpu_ema::schedule::Policy,
        start: &[Vec<f32>],
    ) -> Self {
        Self {
            kappa: b.ema_power,
            eta: b.bias_power,
            rho: b.lag,
            gamma: b.multiplier,
            tau: policy.update_after_step,
            every: policy.update_every,
            restart: b.restart_every,
            ema: widen(start),
            theta0: widen(start),
            t: 0,
            copied: true,
        }
    }

    pub fn call(&mut self, n: u64, theta: &[Vec<f32>]) {
        let restart =
            n > self.tau && self.restart > 0 && (n - self.tau).is_multiple_of(self.restart);
        self.copied = n <= self.tau || restart;
        if self.copied {
            self.ema = widen(theta);
            self.theta0 = widen(theta);
            self.t = 0;
            return;
        }
        let k = n - self.tau;
        if !k.is_multiple_of(self.every) {
            return;
        }
        let t = if self.restart > 0 {
            k % self.restart
        } else {
            k
        };
        let beta = (self.rho + self.gamma * t as f64).powf(-self.kappa);
        for (e, p) in self.ema.iter_mut().zip(theta) {
            for (x, &y) in e.iter_mut().zip(p) {
                *x = (1.0 - beta) * *x + beta * f64::from(y);
            }
        }
        self.t = t;
    }

    pub fn weights(&self, theta: &[Vec<f32>]) -> Vec<Vec<f64>> {
        let a = if self.t == 0 {
            0.0
        } else {
            (self.rho + self.gamma * self.t as f64).powf(-self.eta)
        };
        self.ema
            .iter()
            .zip(&self.theta0)
            .zip(theta)
            .map(|((e, z), p)| {
                e.iter()
                    .zip(z)
                    .zip(p)
                    .map(|((&e, &z), &p)| e + a * (f64::from(p) - z))
                    .collect()
            })
            .collect()
    }
}
