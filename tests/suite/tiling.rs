//! Both ways of spreading a step's items over the shader's invocations (`Tiling::Gpu`, which
//! real GPUs get, and `Tiling::Software`, which lavapipe and llvmpipe get by default), each
//! run here on whatever adapter the tests have, against the CPU path bit for bit.
//!
//! The tensors are chosen so that every route through the entry points runs in both: tensors
//! larger than one workgroup's items (whole workgroups inside one chunk-table row, found once
//! per workgroup) and their last, partial workgroups; a row of 16-bit parameters and a copied
//! row inside such workgroups (the row-constant branches the common row drops); parameters at
//! an offset the `vec4` loads cannot take; and small tensors sharing workgroups (each
//! invocation finding its rows), with one and with several parameter buffers per dispatch.

use crate::common::{bits, buffer_with, gpu, half_buffer, random, read_words, ulps, write};
use half::{bf16, f16};
use wgpu_ema::cpu::CpuEma;
use wgpu_ema::select::Selection;
use wgpu_ema::{
    wgpu, GpuContext, GpuEma, Numerics, ParamArena, ParamDtype, Schedule, TensorSpec, Tiling,
};

/// f32 tensors in buffers of their own: (name, elements, byte offset). A workgroup takes 4,096
/// elements under one tiling and 32,768 under the other: `big` spans several workgroups and
/// ends in a partial item, and offset 4 keeps `odd` off the `vec4` path.
const OWN: [(&str, usize, u64); 3] = [
    ("big", 100_003, 0),
    ("odd", 70_001, 4),
    ("stats.running_mean", 50_000, 0),
];
/// 16-bit parameters, each in a buffer of its own: (name, elements, dtype). Two spans of the
/// software tiling and more, so that whole workgroups lie in their rows wherever they start.
const HALVES: [(&str, usize, ParamDtype); 2] = [
    ("half.bf16", 70_001, ParamDtype::BF16),
    ("half.f16", 66_003, ParamDtype::F16),
];
/// Tensors in an arena, one dispatch: `edge` first, ending one item short of a multiple of
/// both tilings' workgroups (its last workgroup holds the next row's first item, which must
/// not be taken for `edge`'s), then small tensors, several rows per workgroup.
const SMALL: [(&str, usize); 5] = [
    ("edge", 65_532),
    ("a.w", 481),
    ("a.b", 29),
    ("c.w", 1285),
    ("d", 3),
];

#[derive(Clone, Copy, Debug)]
struct Variant {
    numerics: Numerics,
    compensated: bool,
    /// A second EMA's decay, updated in the same pass.
    extra: Option<f64>,
    /// Parameter buffers per dispatch (`None`: the device's default).
    slots: Option<usize>,
    /// Track the 16-bit tensors too (then nothing is swapped: a swap with 16-bit
    /// parameters would round the shadows, and is refused).
    halves: bool,
}

/// Seeded 16-bit values: their bits, and the f32 values they decode to.
fn half_values(dtype: ParamDtype, seed: u64, n: usize) -> (Vec<u16>, Vec<f32>) {
    random(seed, n)
        .iter()
        .map(|&x| round_half(dtype, x))
        .unzip()
}

/// `x` rounded to nearest even in `dtype` (16-bit): its bits and its value.
fn round_half(dtype: ParamDtype, x: f32) -> (u16, f32) {
    if dtype == ParamDtype::F16 {
        let h = f16::from_f32(x);
        (h.to_bits(), h.to_f32())
    } else {
        let h = bf16::from_f32(x);
        (h.to_bits(), h.to_f32())
    }
}

/// Runs `steps` updates of `variant` under `tiling` and compares the shadows (every EMA) with
/// the CPU path's; then swaps and copies into the parameters and checks the buffers.
fn run(ctx: &GpuContext, tiling: Tiling, v: Variant) {
    let what = format!("{tiling:?} {v:?}");
    let software = ctx.adapter.get_info().device_type == wgpu::DeviceType::Cpu;
    let decay = 0.9;
    let mut schedules = vec![Schedule::constant(decay)];
    schedules.extend(v.extra.map(Schedule::constant));
    let selection = Selection::new().copy("*.running_*");

    let own_bufs: Vec<wgpu::Buffer> = OWN
        .iter()
        .enumerate()
        .map(|(i, &(_, n, off))| buffer_with(ctx, &random(10 + i as u64, n), off))
        .collect();
    let half_start: Vec<Vec<f32>> = HALVES
        .iter()
        .enumerate()
        .map(|(i, &(_, n, dtype))| half_values(dtype, 20 + i as u64, n).1)
        .collect();
    let half_bufs: Vec<wgpu::Buffer> = HALVES
        .iter()
        .enumerate()
        .map(|(i, &(_, n, dtype))| half_buffer(ctx, &half_values(dtype, 20 + i as u64, n).0, 0))
        .collect();
    let arena = ParamArena::new(
        &ctx.device,
        SMALL.iter().map(|&(name, n)| TensorSpec::new(name, [n])),
    )
    .unwrap();
    for (i, &(name, n)) in SMALL.iter().enumerate() {
        arena
            .write(&ctx.queue, name, &random(30 + i as u64, n))
            .unwrap();
    }

    let mut builder = GpuEma::builder(schedules[0])
        .tiling(tiling)
        .numerics(v.numerics)
        .compensated(v.compensated)
        .select(selection.clone())
        .track_arena(&arena);
    if let Some(extra) = v.extra {
        builder = builder.extra_ema(Schedule::constant(extra));
    }
    if let Some(slots) = v.slots {
        builder = builder.param_slots(slots);
    }
    for (&(name, n, off), buf) in OWN.iter().zip(&own_bufs) {
        builder = builder.track_buffer(TensorSpec::new(name, [n]), buf, off);
    }
    if v.halves {
        for (&(name, n, dtype), buf) in HALVES.iter().zip(&half_bufs) {
            builder = builder.track_buffer_as(TensorSpec::new(name, [n]), buf, 0, dtype);
        }
    }
    let mut ema = builder.build(&ctx.device, &ctx.queue).unwrap();

    // The CPU path, one EMA per schedule, fed the same values (16-bit ones decoded).
    let mut names: Vec<(String, usize)> = SMALL.iter().map(|&(s, n)| (s.to_string(), n)).collect();
    names.extend(OWN.iter().map(|&(s, n, _)| (s.to_string(), n)));
    if v.halves {
        names.extend(HALVES.iter().map(|&(s, n, _)| (s.to_string(), n)));
    }
    let start = |name: &str| -> Vec<f32> {
        if let Some(i) = SMALL.iter().position(|s| s.0 == name) {
            return random(30 + i as u64, SMALL[i].1);
        }
        if let Some(i) = OWN.iter().position(|s| s.0 == name) {
            return random(10 + i as u64, OWN[i].1);
        }
        let i = HALVES.iter().position(|s| s.0 == name).unwrap();
        half_start[i].clone()
    };
    let mut cpus: Vec<CpuEma> = schedules
        .iter()
        .map(|&s| {
            let mut c = CpuEma::new(s, v.numerics).unwrap();
            c.set_compensated(v.compensated).unwrap();
            for (name, n) in &names {
                c.track(TensorSpec::new(name.as_str(), [*n]), &start(name))
                    .unwrap();
            }
            c.select(&selection).unwrap();
            c
        })
        .collect();

    let steps = 4u64;
    let mut last: Vec<Vec<f32>> = Vec::new();
    for step in 1..=steps {
        let now: Vec<Vec<f32>> = names
            .iter()
            .enumerate()
            .map(|(i, (name, n))| {
                let seed = 1000 * step + i as u64;
                if let Some(h) = HALVES.iter().position(|s| s.0 == name) {
                    let (mut words, f) = half_values(HALVES[h].2, seed, *n);
                    if words.len() % 2 == 1 {
                        words.push(0xFFFF); // whole words; the NaN neighbour stays
                    }
                    ctx.queue
                        .write_buffer(&half_bufs[h], 0, bytemuck::cast_slice(&words));
                    return f;
                }
                let f = random(seed, *n);
                if let Some(j) = OWN.iter().position(|s| s.0 == name) {
                    write(ctx, &own_bufs[j], OWN[j].2, &f);
                } else {
                    arena.write(&ctx.queue, name, &f).unwrap();
                }
                f
            })
            .collect();
        ema.update().unwrap();
        let views: Vec<&[f32]> = now.iter().map(Vec::as_slice).collect();
        for c in &mut cpus {
            c.update(&views).unwrap();
        }
        last = now;
    }

    // Bit for bit on software devices (no fused multiply-add); within an ulp per step where a
    // GPU fuses.
    let allowed = if software { 0 } else { steps };
    for (k, cpu) in cpus.iter().enumerate() {
        let got = ema.read_ema_blocking(k).unwrap();
        for (name, _) in &names {
            let (g, c) = (got.try_get(name).unwrap(), cpu.shadow(name).unwrap());
            assert_eq!(g.len(), c.len());
            let worst = g
                .iter()
                .zip(c)
                .map(|(a, b)| ulps(*a, *b))
                .max()
                .unwrap_or(0);
            assert!(
                worst <= allowed,
                "{what}: EMA {k} `{name}` is {worst} ulps from the CPU path"
            );
        }
    }

    // Swap: each f32 buffer holds the shadows as read back (compensated ones folded), then
    // the parameters again; copy into the parameters: the shadows.
    let shadows = ema.read_shadows_blocking().unwrap();
    let param_words = |j: usize| -> Vec<u32> {
        let (_, n, off) = OWN[j];
        let at = (off / 4) as usize;
        read_words(ctx, &own_bufs[j])[at..at + n].to_vec()
    };
    let check = |when: &str, want: &dyn Fn(usize, &str) -> Vec<u32>| {
        for (j, &(name, ..)) in OWN.iter().enumerate() {
            assert!(param_words(j) == want(j, name), "{what}: `{name}` {when}");
        }
    };
    let shadow_bits = |_: usize, name: &str| bits(shadows.try_get(name).unwrap());
    if !v.halves {
        ema.swap().unwrap();
        check("swapped in", &shadow_bits);
        ema.swap().unwrap();
        check("swapped back", &|j, _| bits(&last[SMALL.len() + j]));
    }
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    ema.record_copy_to_params(&mut enc).unwrap();
    ctx.queue.submit(Some(enc.finish()));
    check("copied in", &shadow_bits);
    // The arena's tensors take their shadows; 16-bit ones the shadows rounded to nearest even.
    let params = arena.read_blocking(&ctx.device, &ctx.queue).unwrap();
    for &(name, _) in &SMALL {
        assert!(
            bits(params.try_get(name).unwrap()) == shadow_bits(0, name),
            "{what}: `{name}` copied in"
        );
    }
    if v.halves {
        for (&(name, n, dtype), buf) in HALVES.iter().zip(&half_bufs) {
            let words = read_words(ctx, buf);
            let got: Vec<u16> = bytemuck::cast_slice::<u32, u16>(&words)[..n].to_vec();
            let want: Vec<u16> = shadows
                .try_get(name)
                .unwrap()
                .iter()
                .map(|&x| round_half(dtype, x).0)
                .collect();
            assert!(got == want, "{what}: `{name}` copied in");
        }
    }
}

#[test]
fn both_tilings_give_the_cpu_paths_bits() {
    let Some(ctx) = gpu() else { return };
    let plain = Variant {
        numerics: Numerics::Exact,
        compensated: false,
        extra: None,
        slots: None,
        halves: true,
    };
    let variants = [
        plain,
        Variant {
            halves: false,
            ..plain
        },
        Variant {
            numerics: Numerics::TensorFlow,
            slots: Some(4),
            ..plain
        },
        Variant {
            compensated: true,
            halves: false,
            ..plain
        },
        Variant {
            extra: Some(0.99),
            ..plain
        },
    ];
    for tiling in [Tiling::Gpu, Tiling::Software, Tiling::Auto] {
        for v in variants {
            run(ctx, tiling, v);
        }
    }
}
