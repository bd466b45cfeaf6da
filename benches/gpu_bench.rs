//! GPU benchmark for real GPUs: GPU time per step from timestamp queries (apart from the
//! submit and wait latency), wall time per step, and host time per step, for flat sizes and
//! for real models' tensor lists tracked three ways. Written to be run by `benches/gpu.sh`
//! beside PyTorch's `_foreach_lerp_` and timm's `ModelEmaV3` (`benches/torch_ema.py`).
//!
//! ```text
//! cargo bench --bench gpu_bench -- [--quick] [--max-log2 N] [--out DIR]
//! ```
//!
//! Writes `DIR/wgpu.csv` (columns shared with the PyTorch script) and `DIR/shapes.json` (the
//! model lists, for the PyTorch script). Without `TIMESTAMP_QUERY` the GPU column is empty
//! and only wall-clock times are reported (software devices run the work inside `submit`).

use std::path::PathBuf;
use std::time::Instant;

use wgpu_ema::{wgpu, GpuContext, GpuEma, ParamArena, Schedule, TensorSpec, Tiling};

#[path = "shared/optimizers.rs"]
mod optimizers;

#[path = "shared/models.rs"]
mod models;

type Error = Box<dyn std::error::Error>;

/// Steps recorded between the two timestamps: the per-step GPU time is their difference / K.
const K: usize = 10;

struct Bench {
    ctx: GpuContext,
    kernels: wgpu::ShaderModule,
    query: Option<(wgpu::QuerySet, wgpu::Buffer, wgpu::Buffer)>,
    reps: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

impl Bench {
    fn wait(&self, idx: wgpu::SubmissionIndex) {
        let _ = self.ctx.device.poll(wgpu::PollType::Wait {
            submission_index: Some(idx),
            timeout: None,
        });
    }

    fn buffer(&self, bytes: u64) -> wgpu::Buffer {
        self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes.max(16),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Median GPU milliseconds per step of `record` (K steps between two timestamps), or
    /// `None` without timestamp queries.
    fn gpu_ms(&self, record: &mut dyn FnMut(&mut wgpu::CommandEncoder)) -> Option<f64> {
        let (qs, resolve, read) = self.query.as_ref()?;
        let period = f64::from(self.ctx.queue.get_timestamp_period());
        let mut out = Vec::new();
        for _ in 0..self.reps {
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            let mark = |enc: &mut wgpu::CommandEncoder, i: u32| {
                enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("timestamp"),
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: qs,
                        beginning_of_pass_write_index: Some(i),
                        end_of_pass_write_index: None,
                    }),
                });
            };
            mark(&mut enc, 0);
            for _ in 0..K {
                record(&mut enc);
            }
            mark(&mut enc, 1);
            enc.resolve_query_set(qs, 0..2, resolve, 0);
            enc.copy_buffer_to_buffer(resolve, 0, read, 0, 16);
            self.wait(self.ctx.queue.submit(Some(enc.finish())));
            read.map_async(wgpu::MapMode::Read, .., |_| {});
            let _ = self.ctx.device.poll(wgpu::PollType::wait_indefinitely());
            let t: [u64; 2] = match read.get_mapped_range(..) {
                Ok(v) => bytemuck::pod_read_unaligned(&v[..16]),
                Err(_) => return None,
            };
            read.unmap();
            out.push(t[1].saturating_sub(t[0]) as f64 * period / 1e6 / K as f64);
        }
        Some(median(out))
    }

    /// Median wall milliseconds of one step submitted and waited for, and median host
    /// microseconds to record and submit one without waiting.
    fn wall(&self, record: &mut dyn FnMut(&mut wgpu::CommandEncoder)) -> (f64, f64) {
        let mut wall = Vec::new();
        let mut host = Vec::new();
        for i in 0..self.reps * 3 {
            let t = Instant::now();
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            record(&mut enc);
            let idx = self.ctx.queue.submit(Some(enc.finish()));
            let h = t.elapsed().as_secs_f64();
            self.wait(idx);
            if i > 0 {
                wall.push(t.elapsed().as_secs_f64() * 1e3);
                host.push(h * 1e6);
            }
        }
        (median(wall), median(host))
    }

    /// A plain kernel from `benches/bench_kernels.wgsl` over `n` elements (vec4).
    fn kernel(&self, entry: &str, n: u64) -> impl FnMut(&mut wgpu::CommandEncoder) {
        let dev = &self.ctx.device;
        let pipe = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module: &self.kernels,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        });
        let (a, b) = (self.buffer(n * 4), self.buffer(n * 4));
        let s = dev.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 16,
            usage: wgpu::BufferUsages::UNIFORM,
            mapped_at_creation: false,
        });
        let mut entries = vec![
            wgpu::BindGroupEntry {
                binding: 0,
                resource: a.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: b.as_entire_binding(),
            },
        ];
        if entry == "axpy_vec4" {
            entries.push(wgpu::BindGroupEntry {
                binding: 2,
                resource: s.as_entire_binding(),
            });
        }
        let bg = dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipe.get_bind_group_layout(0),
            entries: &entries,
        });
        let groups = (n / 4).div_ceil(256).max(1);
        let x = groups.min(65_535);
        let y = groups.div_ceil(x);
        move |enc: &mut wgpu::CommandEncoder| {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipe);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(x as u32, y as u32, 1);
        }
    }
}

struct Row {
    workload: String,
    elements: u64,
    tensors: usize,
    gpu_ms: Option<f64>,
    wall_ms: f64,
    host_us: f64,
    bytes_per_elem: u64,
}

fn measure(
    b: &Bench,
    rows: &mut Vec<Row>,
    workload: String,
    (elements, tensors, bytes_per_elem): (u64, usize, u64),
    record: &mut dyn FnMut(&mut wgpu::CommandEncoder),
) {
    let gpu_ms = b.gpu_ms(record);
    let (wall_ms, host_us) = b.wall(record);
    let r = Row {
        workload,
        elements,
        tensors,
        gpu_ms,
        wall_ms,
        host_us,
        bytes_per_elem,
    };
    let ms = r.gpu_ms.unwrap_or(r.wall_ms);
    println!(
        "{:<34} {:>11} {:>4} {:>10} {:>9.4} {:>8.1} {:>9.1}",
        r.workload,
        r.elements,
        r.tensors,
        r.gpu_ms.map_or("n/a".into(), |m| format!("{m:.4}")),
        r.wall_ms,
        (r.elements * r.bytes_per_elem) as f64 / ms / 1e6,
        r.host_us
    );
    rows.push(r);
}

/// `specs` tracked three ways: an arena; one buffer per tensor; the tensors packed in 4
/// buffers at 4-byte offsets that are not multiples of 16 (as a framework's pool might).
fn model_rows(
    b: &Bench,
    rows: &mut Vec<Row>,
    model: &str,
    specs: &[TensorSpec],
) -> Result<(), Error> {
    let ctx = &b.ctx;
    let total: u64 = specs.iter().map(TensorSpec::numel).sum();
    let shape = (total, specs.len(), 12);
    let arena = ParamArena::new(&ctx.device, specs.to_vec())?;
    let mut a = GpuEma::builder(Schedule::tf(0.9999))
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)?;
    let label = |how: &str, e: &GpuEma| format!("{model}-{how} ({} disp)", e.dispatches_per_step());
    measure(b, rows, label("arena", &a), shape, &mut |enc| {
        let _ = a.record_update(enc);
    });
    drop(a);
    // The same arena under the software devices' tiling, for comparison with the default.
    let mut s = GpuEma::builder(Schedule::tf(0.9999))
        .tiling(Tiling::Software)
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)?;
    measure(
        b,
        rows,
        label("arena-tiling-software", &s),
        shape,
        &mut |enc| {
            let _ = s.record_update(enc);
        },
    );
    drop(s);
    drop(arena);
    let own: Vec<wgpu::Buffer> = specs.iter().map(|s| b.buffer(s.numel() * 4)).collect();
    let mut e = specs
        .iter()
        .zip(&own)
        .fold(GpuEma::builder(Schedule::tf(0.9999)), |bl, (s, p)| {
            bl.track_buffer(s.clone(), p, 0)
        })
        .build(&ctx.device, &ctx.queue)?;
    measure(b, rows, label("buffers", &e), shape, &mut |enc| {
        let _ = e.record_update(enc);
    });
    drop(e);
    drop(own);
    let mut ends = [0u64; 4];
    let mut places = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let at = ends[i % 4] + 4 * (i as u64 % 3 + 1);
        ends[i % 4] = at + s.numel() * 4;
        places.push((i % 4, at));
    }
    // 16 bytes of slack: the rebind measurement below moves every tensor by 4 bytes and back.
    let pools: Vec<wgpu::Buffer> = ends.iter().map(|&e| b.buffer(e + 16)).collect();
    let mut e = specs
        .iter()
        .zip(&places)
        .fold(
            GpuEma::builder(Schedule::tf(0.9999)),
            |bl, (s, &(p, at))| bl.track_buffer(s.clone(), &pools[p], at),
        )
        .build(&ctx.device, &ctx.queue)?;
    measure(b, rows, label("4-buffers", &e), shape, &mut |enc| {
        let _ = e.record_update(enc);
    });
    // What a framework handing out new offsets every step costs: every tensor rebound (moved
    // by 4 bytes, then back), then one step recorded. Host time only; nothing is submitted.
    let dispatches = e.dispatches_per_step();
    let mut host = Vec::new();
    for round in 0..200u64 {
        let t = Instant::now();
        for (i, (s, &(p, at))) in specs.iter().zip(&places).enumerate() {
            let _ = i;
            e.rebind(&s.name, &pools[p], at + 4 * (round % 2))?;
        }
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        e.record_update(&mut enc)?;
        drop(enc.finish());
        host.push(t.elapsed().as_secs_f64() * 1e6);
    }
    println!(
        "{model}: rebinding all {} tensors and recording a step: {:.1} us on the host (median of 200), {} dispatch(es) before and {} after",
        specs.len(),
        median(host),
        dispatches,
        e.dispatches_per_step()
    );
    Ok(())
}

/// SGD, SGD with momentum and AdamW over `n` f32 (`benches/shared/optimizers.rs`): alone, with
/// our separate EMA pass after them, and with the EMA fused into them (`GpuEma::epilogue`).
fn fused_rows(b: &Bench, rows: &mut Vec<Row>, n: u64) -> Result<(), Error> {
    let ctx = &b.ctx;
    let arena = ParamArena::new(&ctx.device, [TensorSpec::new("p", [n as usize])])?;
    let mut ema = GpuEma::builder(Schedule::tf(0.9999))
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)?;
    let epilogue = ema.epilogue(1)?;
    let opt = optimizers::Optimizers::new(&ctx.device, &ctx.queue, &arena, &epilogue, n)?;
    for (which, &(name, bytes)) in optimizers::OPTIMIZERS.iter().enumerate() {
        measure(b, rows, format!("opt-{name}"), (n, 1, bytes), &mut |enc| {
            opt.record(enc, which, None)
        });
        measure(
            b,
            rows,
            format!("opt-{name}+ema-pass"),
            (n, 1, bytes + 12),
            &mut |enc| {
                opt.record(enc, which, None);
                let _ = ema.record_update(enc);
            },
        );
        measure(
            b,
            rows,
            format!("opt-{name}-fused"),
            (n, 1, bytes + 8),
            &mut |enc| {
                if let Ok(step) = ema.fused_step() {
                    opt.record(enc, which, Some(&step));
                }
            },
        );
    }
    Ok(())
}

fn shapes_json(models: &[(&str, Vec<TensorSpec>)]) -> String {
    let lists: Vec<String> = models
        .iter()
        .map(|(name, specs)| {
            let shapes: Vec<String> = specs.iter().map(|s| format!("{:?}", s.shape)).collect();
            format!("\"{name}\": [{}]", shapes.join(", "))
        })
        .collect();
    format!("{{{}}}\n", lists.join(", "))
}

fn main() -> Result<(), Error> {
    let mut out = PathBuf::from("target/gpu-bench");
    let mut quick = false;
    let mut max_log2 = 26u32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--out" => out = args.next().ok_or("--out needs a value")?.into(),
            "--max-log2" => max_log2 = args.next().ok_or("--max-log2 needs a value")?.parse()?,
            "--bench" => {} // passed by `cargo bench`
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    std::fs::create_dir_all(&out)?;
    let models = vec![
        ("resnet50", models::resnet50()),
        ("gpt2_small", models::gpt2_small()),
    ];
    std::fs::write(out.join("shapes.json"), shapes_json(&models))?;

    let ctx = GpuContext::new()?;
    let query = ctx
        .device
        .features()
        .contains(wgpu::Features::TIMESTAMP_QUERY)
        .then(|| {
            let qs = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("gpu_bench"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            });
            let resolve = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: 16,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let read = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: 16,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            (qs, resolve, read)
        });
    println!("adapter: {}", ctx.describe());
    println!(
        "timestamps: {}; max storage binding {} MiB",
        if query.is_some() {
            "yes"
        } else {
            "no (wall clock only)"
        },
        ctx.device.limits().max_storage_buffer_binding_size >> 20
    );
    let kernels = ctx
        .device
        .create_shader_module(wgpu::include_wgsl!("bench_kernels.wgsl"));
    let b = Bench {
        ctx,
        kernels,
        query,
        reps: if quick { 3 } else { 9 },
    };
    println!(
        "\n{:<34} {:>11} {:>4} {:>10} {:>9} {:>8} {:>9}",
        "workload", "elements", "tens", "GPU ms", "wall ms", "GB/s", "host us"
    );
    let mut rows = Vec::new();
    let max_log2 = if quick { max_log2.min(20) } else { max_log2 };
    // Bring the GPU out of its idle clocks first: on a freshly started H200 the SMs idled at
    // 345 MHz, and model rows measured in the first seconds ran 2-3x slower than a minute later.
    let warm = std::time::Instant::now();
    let mut spin = b.kernel(
        "axpy_vec4",
        (1 << 24).min(b.ctx.device.limits().max_storage_buffer_binding_size / 4),
    );
    while warm.elapsed().as_secs_f64() < if quick { 0.2 } else { 3.0 } {
        let mut enc = b.ctx.device.create_command_encoder(&Default::default());
        for _ in 0..20 {
            spin(&mut enc);
        }
        b.wait(b.ctx.queue.submit(Some(enc.finish())));
    }
    if !quick {
        for (name, specs) in &models {
            model_rows(&b, &mut rows, name, specs)?;
        }
    } else {
        model_rows(&b, &mut rows, "resnet50", &models[0].1)?;
    }
    let limit = b.ctx.device.limits().max_storage_buffer_binding_size / 4;
    for k in (16..=max_log2).step_by(2).filter(|k| !quick || *k >= 18) {
        let n = 1u64 << k;
        let m = n.min(limit);
        measure(
            &b,
            &mut rows,
            format!("flat-2^{k}-axpy-vec4"),
            (m, 1, 12),
            &mut b.kernel("axpy_vec4", m),
        );
        measure(
            &b,
            &mut rows,
            format!("flat-2^{k}-copy-vec4"),
            (m, 1, 8),
            &mut b.kernel("copy_vec4", m),
        );
        let arena = ParamArena::new(&b.ctx.device, [TensorSpec::new("p", [n as usize])])?;
        let mut e = GpuEma::builder(Schedule::tf(0.9999))
            .track_arena(&arena)
            .build(&b.ctx.device, &b.ctx.queue)?;
        measure(
            &b,
            &mut rows,
            format!("flat-2^{k}-ema"),
            (n, 1, 12),
            &mut |enc| {
                let _ = e.record_update(enc);
            },
        );
    }
    fused_rows(&b, &mut rows, (1u64 << max_log2.min(24)).min(limit))?;
    let mut csv =
        String::from("source,workload,elements,tensors,ms_per_step,gb_per_s,host_us_per_step\n");
    for r in &rows {
        let ms = r.gpu_ms.unwrap_or(r.wall_ms);
        csv += &format!(
            "wgpu-ema,{},{},{},{:.6},{:.2},{:.1}\n",
            r.workload,
            r.elements,
            r.tensors,
            ms,
            (r.elements * r.bytes_per_elem) as f64 / ms / 1e6,
            r.host_us
        );
    }
    std::fs::write(out.join("wgpu.csv"), csv)?;
    println!(
        "\nGB/s from GPU time where measured, else wall time; wrote {}",
        out.join("wgpu.csv").display()
    );
    Ok(())
}
