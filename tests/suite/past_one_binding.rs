//! Large sizes: a 16.7-million-element tensor at an odd offset, and tensors past one storage
//! binding, on a device whose bindings are capped at 128 MiB (`gpu_small_bindings`) so that
//! the split happens on every GPU, not only on Mesa's drivers. (A dispatch past 65,535
//! workgroups in one dimension needs more than 256 MiB of shadows in one binding: the
//! planner's unit tests check the 2-D split.)

use crate::common::{
    assert_close, assert_shadows_close, buffer_with, gpu, gpu_small_bindings, random, write,
};
use wgpu_ema::cpu::ReferenceEma;
use wgpu_ema::{GpuEma, Numerics, ParamArena, Schedule, TensorSpec};

const TOL: f64 = 4.0 * f32::EPSILON as f64;

#[test]
fn a_large_tensor_at_an_odd_offset() {
    let Some(ctx) = gpu() else { return };
    // 65,535 * 256 + 1 elements at offset 4: 4,096 workgroups of 1,024 items, the last item
    // padded.
    let n = 65_535 * 256 + 1;
    let schedule = Schedule::constant(0.7);
    let p0 = random(11, n);
    let buf = buffer_with(ctx, &p0, 4);
    let mut ema = GpuEma::builder(schedule)
        .track_buffer(TensorSpec::new("big", [n]), &buf, 4)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    let mut reference = ReferenceEma::new(schedule, Numerics::Exact, &[&p0]).unwrap();
    for step in 0..2 {
        let p = random(20 + step, n);
        write(ctx, &buf, 4, &p);
        ema.update().unwrap();
        reference.update(&[&p]).unwrap();
    }
    let got = ema.read_shadow_blocking("big").unwrap();
    assert_close(
        "16.7 million elements at offset 4",
        &got,
        &reference.shadows()[0],
        2.0 * TOL,
    );
}

#[test]
fn one_past_the_storage_binding_limit() {
    let Some(ctx) = gpu_small_bindings() else {
        return;
    };
    let limit = ctx.device.limits().max_storage_buffer_binding_size;
    assert!(limit <= 128 << 20, "the test device's bindings are capped");
    let n = (limit / 4) as usize + 1;
    let schedule = Schedule::tf(0.9);
    // An arena with a small tensor first, so the big one's chunks do not start at 0.
    let specs = [TensorSpec::new("small", [3]), TensorSpec::new("big", [n])];
    let arena = ParamArena::new(&ctx.device, specs.clone()).unwrap();
    let init = [random(1, 3), random(2, n)];
    for (s, v) in specs.iter().zip(&init) {
        arena.write(&ctx.queue, &s.name, v).unwrap();
    }
    let mut ema = GpuEma::builder(schedule)
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    assert_eq!(ema.dispatches_per_step(), 2, "split into two bindings");
    let mut reference =
        ReferenceEma::new(schedule, Numerics::Exact, &[&init[0], &init[1]]).unwrap();
    let p = [random(3, 3), random(4, n)];
    for (s, v) in specs.iter().zip(&p) {
        arena.write(&ctx.queue, &s.name, v).unwrap();
    }
    ema.update().unwrap();
    reference.update(&[&p[0], &p[1]]).unwrap();
    let got = ema.read_shadows_blocking().unwrap();
    assert_close(
        "small",
        got.try_get("small").unwrap(),
        &reference.shadows()[0],
        TOL,
    );
    assert_close(
        "big",
        got.try_get("big").unwrap(),
        &reference.shadows()[1],
        TOL,
    );

    // The same tensor in a user buffer at an odd offset: read through overlapping windows.
    let buf = buffer_with(ctx, &init[1], 8);
    let mut ema = GpuEma::builder(schedule)
        .track_buffer(TensorSpec::new("big", [n]), &buf, 8)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    assert!(ema.dispatches_per_step() >= 2);
    write(ctx, &buf, 8, &p[1]);
    ema.update().unwrap();
    let shadow = ema.read_shadow_blocking("big").unwrap();
    assert_close("big, user buffer", &shadow, &reference.shadows()[1], TOL);

    // Evaluation writes the parameters through the same overlapping windows: swapped in and
    // back out, bit for bit (and, in debug builds, no two writable bindings of a dispatch
    // overlap: WebGPU's rule).
    ema.swap().unwrap();
    let words = crate::common::read_words(ctx, &buf);
    let swapped: Vec<f32> = words[2..2 + n].iter().map(|&w| f32::from_bits(w)).collect();
    assert!(swapped
        .iter()
        .zip(&shadow)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    ema.swap().unwrap();
    let words = crate::common::read_words(ctx, &buf);
    assert!(words[2..2 + n]
        .iter()
        .zip(&p[1])
        .all(|(&a, b)| a == b.to_bits()));
}

/// Tensors of one arena larger than a binding whose shadows share a shadow buffer but whose
/// parameters lie in adjacent (overlapping) windows: updated, then swapped in and out exactly.
/// Writing the parameters through two overlapping windows in one dispatch is what WebGPU
/// forbids; such windows go to separate dispatches.
#[test]
fn adjacent_windows_of_one_buffer() {
    let Some(ctx) = gpu_small_bindings() else {
        return;
    };
    let limit = ctx.device.limits().max_storage_buffer_binding_size;
    assert!(limit <= 128 << 20, "the test device's bindings are capped");
    let quarter = (limit / 16) as usize; // elements in a quarter binding
                                         // a: window 0; b: up to 0.55 binding (window 0); c: past half a binding (window 1);
                                         // d: enough to take the arena past one binding and the shadows into a second buffer.
    let specs = [
        TensorSpec::new("a", [5]),
        TensorSpec::new("b", [quarter * 11 / 5]),
        TensorSpec::new("c", [7]),
        TensorSpec::new("d", [quarter * 2]),
    ];
    let arena = ParamArena::new(&ctx.device, specs.clone()).unwrap();
    assert!(arena.size() > limit);
    let init: Vec<Vec<f32>> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| random(10 + i as u64, s.numel() as usize))
        .collect();
    for (s, v) in specs.iter().zip(&init) {
        arena.write(&ctx.queue, &s.name, v).unwrap();
    }
    let schedule = Schedule::constant(0.75);
    // Several windows per dispatch (software adapters default to one).
    let mut ema = GpuEma::builder(schedule)
        .param_slots(4)
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    let refs: Vec<&[f32]> = init.iter().map(Vec::as_slice).collect();
    let mut reference = ReferenceEma::new(schedule, Numerics::Exact, &refs).unwrap();
    let p: Vec<Vec<f32>> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| random(20 + i as u64, s.numel() as usize))
        .collect();
    for (s, v) in specs.iter().zip(&p) {
        arena.write(&ctx.queue, &s.name, v).unwrap();
    }
    ema.update().unwrap();
    let refs: Vec<&[f32]> = p.iter().map(Vec::as_slice).collect();
    reference.update(&refs).unwrap();
    let shadows = ema.read_shadows_blocking().unwrap();
    assert_shadows_close(&shadows, &specs, &reference, TOL);
    ema.swap().unwrap();
    let swapped = arena.read_blocking(&ctx.device, &ctx.queue).unwrap();
    ema.swap().unwrap();
    let back = arena.read_blocking(&ctx.device, &ctx.queue).unwrap();
    for (s, v) in specs.iter().zip(&p) {
        let same = |a: &[f32], b: &[f32]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
        };
        assert!(
            same(
                swapped.try_get(&s.name).unwrap(),
                shadows.try_get(&s.name).unwrap()
            ),
            "{}",
            s.name
        );
        assert!(same(back.try_get(&s.name).unwrap(), v), "{}", s.name);
    }
}

/// A rebind that moves a tensor to a window overlapping another window of the same buffer in
/// its dispatch: the rebind re-plans instead of binding both there, so evaluation (which writes
/// the parameters through these bindings) stays within WebGPU's rule and exact.
#[test]
fn rebind_next_to_an_overlapping_window() {
    let Some(ctx) = gpu_small_bindings() else {
        return;
    };
    let limit = ctx.device.limits().max_storage_buffer_binding_size;
    assert!(limit <= 128 << 20, "the test device's bindings are capped");
    let n = 16usize;
    let size = limit + limit / 2 + 4096;
    let buf = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("windows"),
        size,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    // x in window [0, L), y in window [L, 1.5 L): disjoint, so one dispatch binds both.
    let (x_at, y_at, y_moved) = (0u64, limit, limit / 2 + 1024);
    let (x0, y0) = (random(1, n), random(2, n));
    write(ctx, &buf, x_at, &x0);
    write(ctx, &buf, y_at, &y0);
    let schedule = Schedule::constant(0.5);
    let mut ema = GpuEma::builder(schedule)
        .param_slots(4)
        .track_buffer(TensorSpec::new("x", [n]), &buf, x_at)
        .track_buffer(TensorSpec::new("y", [n]), &buf, y_at)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    assert_eq!(ema.dispatches_per_step(), 1);
    let mut reference = ReferenceEma::new(schedule, Numerics::Exact, &[&x0, &y0]).unwrap();
    // y moves to [L/2 + 1 KiB, ...), read through window [L/2, 1.5 L), which overlaps x's.
    let y1 = random(3, n);
    write(ctx, &buf, y_moved, &y1);
    ema.rebind("y", &buf, y_moved).unwrap();
    ema.update().unwrap();
    reference.update(&[&x0, &y1]).unwrap();
    let shadows = ema.read_shadows_blocking().unwrap();
    assert_shadows_close(&shadows, &ema.specs(), &reference, TOL);

    let read = |at: u64| -> Vec<u32> {
        let words = crate::common::read_words(ctx, &buf);
        words[(at / 4) as usize..][..n].to_vec()
    };
    let bits = |v: &[f32]| -> Vec<u32> { v.iter().map(|x| x.to_bits()).collect() };
    ema.swap().unwrap();
    assert_eq!(read(x_at), bits(shadows.try_get("x").unwrap()));
    assert_eq!(read(y_moved), bits(shadows.try_get("y").unwrap()));
    ema.swap().unwrap();
    assert_eq!(read(x_at), bits(&x0));
    assert_eq!(read(y_moved), bits(&y1));
}
