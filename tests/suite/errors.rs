//! Bad input gives a clear `Error` naming the tensor, and changes nothing.

use crate::common::{buffer_with, gpu, random};
use wgpu_ema::{wgpu, Error, GpuEma, ParamArena, Schedule, TensorSpec};

#[test]
fn invalid_decays_are_refused_at_build() {
    let Some(ctx) = gpu() else { return };
    let buf = buffer_with(ctx, &random(1, 4), 0);
    for d in [f64::NAN, -0.5, 1.0001] {
        let err = GpuEma::builder(Schedule::tf(d))
            .track_buffer(TensorSpec::new("w", [4]), &buf, 0)
            .build(&ctx.device, &ctx.queue)
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidDecay { what: "decay", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("[0, 1]"));
    }
}

#[test]
fn buffer_problems_name_the_tensor() {
    let Some(ctx) = gpu() else { return };
    let good = buffer_with(ctx, &random(1, 16), 0);
    let no_storage = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 64,
        usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let build = |spec: TensorSpec, buf: &wgpu::Buffer, off: u64| {
        GpuEma::builder(Schedule::constant(0.9))
            .track_buffer(spec, buf, off)
            .build(&ctx.device, &ctx.queue)
            .unwrap_err()
    };
    let e = build(TensorSpec::new("w", [4]), &no_storage, 0);
    assert!(
        matches!(&e, Error::MissingUsage { name, .. } if name == "w"),
        "{e}"
    );
    assert!(e.to_string().contains("STORAGE"), "{e}");
    let e = build(TensorSpec::new("b", [4]), &good, 6);
    assert!(
        matches!(&e, Error::Misaligned { name, offset: 6 } if name == "b"),
        "{e}"
    );
    // good holds 16 + 7 elements: 20 from offset 16 run past its end.
    let e = build(TensorSpec::new("c", [20]), &good, 16);
    assert!(
        matches!(&e, Error::OutOfBounds { name, .. } if name == "c"),
        "{e}"
    );
    let e = GpuEma::builder(Schedule::constant(0.9))
        .track_buffer(TensorSpec::new("d", [2]), &good, 0)
        .track_buffer(TensorSpec::new("d", [2]), &good, 8)
        .build(&ctx.device, &ctx.queue)
        .unwrap_err();
    assert!(
        matches!(&e, Error::DuplicateName { name } if name == "d"),
        "{e}"
    );
}

#[test]
fn names_and_lengths_are_checked_after_build() {
    let Some(ctx) = gpu() else { return };
    let p = random(2, 8);
    let buf = buffer_with(ctx, &p, 0);
    let mut ema = GpuEma::builder(Schedule::constant(0.9))
        .track_buffer(TensorSpec::new("w", [8]), &buf, 0)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    assert!(matches!(
        ema.read_shadow_blocking("nope"),
        Err(Error::UnknownName { .. })
    ));
    assert!(matches!(
        ema.rebind("nope", &buf, 0),
        Err(Error::UnknownName { .. })
    ));
    assert!(matches!(
        ema.rebind("w", &buf, 2),
        Err(Error::Misaligned { .. })
    ));
    assert!(matches!(
        ema.rebind("w", &buf, 4096),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(matches!(
        ema.write_shadow("w", &[1.0; 3]),
        Err(Error::LengthMismatch {
            expected: 8,
            got: 3,
            ..
        })
    ));
    // None of the refused calls changed the shadows.
    assert_eq!(ema.read_shadow_blocking("w").unwrap(), p);
}

#[test]
fn arena_problems() {
    let Some(ctx) = gpu() else { return };
    let e = ParamArena::new(
        &ctx.device,
        [TensorSpec::new("a", [2]), TensorSpec::new("a", [3])],
    )
    .unwrap_err();
    assert!(matches!(&e, Error::DuplicateName { name } if name == "a"));
    let arena = ParamArena::new(&ctx.device, [TensorSpec::new("a", [2])]).unwrap();
    assert!(matches!(
        arena.write(&ctx.queue, "a", &[1.0]),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(arena.offset("b"), Err(Error::UnknownName { .. })));
    let huge = TensorSpec::new("huge", [ctx.device.limits().max_buffer_size as usize]);
    assert!(matches!(
        ParamArena::new(&ctx.device, [huge]),
        Err(Error::TooLarge { .. })
    ));
    // An arena name clashing with a user buffer's.
    let buf = buffer_with(ctx, &random(3, 2), 0);
    let e = GpuEma::builder(Schedule::constant(0.5))
        .track_arena(&arena)
        .track_buffer(TensorSpec::new("a", [2]), &buf, 0)
        .build(&ctx.device, &ctx.queue)
        .unwrap_err();
    assert!(matches!(e, Error::DuplicateName { .. }));
    let mut ema = GpuEma::builder(Schedule::constant(0.5))
        .track_arena(&arena)
        .build(&ctx.device, &ctx.queue)
        .unwrap();
    assert!(matches!(
        ema.rebind("a", &buf, 0),
        Err(Error::NotRebindable { .. })
    ));
}
