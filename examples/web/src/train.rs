//! The linear model trained in the tab: momentum SGD in WGSL and the EMA in the same encoder,
//! as `train_linear` does natively, but with nothing that blocks: every readback is a future
//! the browser resolves.

use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;

use wgpu_ema::checkpoint::{self, Checkpoint, RestoreOptions};
use wgpu_ema::{wgpu, GpuContext, GpuEma, HostTensors, ParamArena, Schedule};

use crate::linear::{
    bind_group, dataset, log_buffer, momentum_specs, pipeline, specs, upload_data,
};
use crate::Error;

/// Most steps one `train` call records (one submit; the log buffer is sized for it).
pub const MAX_STEPS_PER_CALL: u32 = 1000;

/// The GPU state of one training run.
pub struct Trainer {
    pub ctx: GpuContext,
    params: ParamArena,
    momentum: ParamArena,
    data: wgpu::Buffer,
    log: wgpu::Buffer,
    /// Where each call's losses are read back (mapped while `reading`).
    staging: wgpu::Buffer,
    reading: Rc<Cell<bool>>,
    pipeline: wgpu::ComputePipeline,
    ema: GpuEma,
    bind_group: wgpu::BindGroup,
    /// Steps trained so far (the EMA's `num_updates`).
    global: u64,
}

impl Trainer {
    pub async fn new(schedule: Schedule) -> Result<Self, Error> {
        let ctx = GpuContext::new_async().await?;
        let device = &ctx.device;
        let params = ParamArena::new(device, specs())?;
        let momentum = ParamArena::new(device, momentum_specs())?;
        let data = upload_data(device, &ctx.queue, &dataset());
        let log = log_buffer(device, MAX_STEPS_PER_CALL as u64);
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("log readback"),
            size: 8 * MAX_STEPS_PER_CALL as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let pipeline = pipeline(device);
        zero(&ctx.queue, &params)?;
        zero(&ctx.queue, &momentum)?;
        let ema = GpuEma::builder(schedule)
            .track_arena(&params)
            .build(device, &ctx.queue)?;
        let bind_group = bind_group(device, &pipeline, &data, &params, &momentum, &ema, &log)?;
        Ok(Self {
            ctx,
            params,
            momentum,
            data,
            log,
            staging,
            reading: Rc::new(Cell::new(false)),
            pipeline,
            ema,
            bind_group,
            global: 0,
        })
    }

    pub fn ema(&self) -> &GpuEma {
        &self.ema
    }

    pub fn global(&self) -> u64 {
        self.global
    }

    pub fn set_schedule(&mut self, schedule: Schedule) -> Result<(), Error> {
        Ok(self.ema.set_schedule(schedule)?)
    }

    /// Back to step 0: zero weights and momentum, shadows equal to the weights.
    pub fn reset(&mut self) -> Result<(), Error> {
        zero(&self.ctx.queue, &self.params)?;
        zero(&self.ctx.queue, &self.momentum)?;
        self.ema = GpuEma::builder(self.ema.schedule())
            .track_arena(&self.params)
            .build(&self.ctx.device, &self.ctx.queue)?;
        self.bind_group = bind_group(
            &self.ctx.device,
            &self.pipeline,
            &self.data,
            &self.params,
            &self.momentum,
            &self.ema,
            &self.log,
        )?;
        self.global = 0;
        Ok(())
    }

    /// Records `steps` training steps, each followed by the EMA update, in one submit; the
    /// future resolves to the held-out loss before each step: raw then EMA, interleaved.
    pub fn train(
        &mut self,
        steps: u32,
    ) -> Result<impl Future<Output = Result<Vec<f32>, Error>> + 'static, Error> {
        // One readback buffer serves every call: the previous call's must be read first.
        if self.reading.get() {
            return Err("the previous train call has not resolved yet".into());
        }
        let steps = steps.clamp(1, MAX_STEPS_PER_CALL);
        let (device, queue) = (&self.ctx.device, &self.ctx.queue);
        let first = u32::try_from(self.global).map_err(|_| "step counter past u32")?;
        queue.write_buffer(&self.log, 0, bytemuck::cast_slice(&[0u32, first, 0, 0]));
        let mut encoder = device.create_command_encoder(&Default::default());
        for g in self.global + 1..=self.global + steps as u64 {
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                pass.set_pipeline(&self.pipeline);
                pass.set_bind_group(0, &self.bind_group, &[]);
                pass.dispatch_workgroups(1, 1, 1);
            }
            // num_updates = the global step, as TensorFlow's article does.
            self.ema.record_update_at(&mut encoder, g)?;
        }
        let bytes = 8 * steps as u64;
        encoder.copy_buffer_to_buffer(&self.log, 16, &self.staging, 0, bytes);
        queue.submit(Some(encoder.finish()));
        self.global += steps as u64;
        self.reading.set(true);
        Ok(read_mapped(
            self.staging.clone(),
            bytes,
            self.reading.clone(),
        ))
    }

    /// A training checkpoint (shadows, weights, momentum, the counter) as safetensors bytes.
    pub fn checkpoint(&self) -> Result<impl Future<Output = Result<Vec<u8>, Error>>, Error> {
        let snapshot = self.ema.snapshot(true)?.into_host();
        let momentum = self.momentum.read(&self.ctx.device, &self.ctx.queue);
        Ok(async move {
            let (snapshot, momentum) = (snapshot.await?, momentum.await?);
            Ok(checkpoint::training_bytes(&snapshot, None, &momentum)?)
        })
    }

    /// The EMA weights alone, under the plain names, as safetensors bytes.
    pub fn export(&self) -> Result<impl Future<Output = Result<Vec<u8>, Error>>, Error> {
        let snapshot = self.ema.snapshot(false)?.into_host();
        Ok(async move { Ok(checkpoint::export_ema_bytes(&snapshot.await?)?) })
    }

    /// Resumes from a training checkpoint's bytes (a file the user picked). Everything is
    /// checked before anything is written; the page's schedule stays in force. Returns the
    /// checkpoint's step.
    pub fn restore(&mut self, bytes: Vec<u8>) -> Result<u64, Error> {
        let ck = Checkpoint::from_bytes(bytes)?;
        let params = ck.params_for(&specs())?;
        let mut momentum = HostTensors::new();
        for s in momentum_specs() {
            let v = ck.tensor_as(&s.name, &s)?.to_vec();
            momentum.insert(s, v)?;
        }
        let opts = RestoreOptions {
            allow_config_mismatch: true,
            ..Default::default()
        };
        self.ema.restore_with(&ck, opts)?;
        for (s, v) in params.iter() {
            self.params.write(&self.ctx.queue, &s.name, v)?;
        }
        for (s, v) in momentum.iter() {
            self.momentum.write(&self.ctx.queue, &s.name, v)?;
        }
        self.global = self.ema.num_updates();
        Ok(self.global)
    }
}

fn zero(queue: &wgpu::Queue, arena: &ParamArena) -> Result<(), Error> {
    for s in arena.specs() {
        arena.write(queue, &s.name, &vec![0.0; s.numel() as usize])?;
    }
    Ok(())
}

/// Maps the first `bytes` of a MAP_READ buffer whose copy is submitted and resolves to them as
/// f32, unmapping it and clearing `reading`. In a browser nothing needs to poll: the map
/// callback runs when the GPU is done.
fn read_mapped(
    staging: wgpu::Buffer,
    bytes: u64,
    reading: Rc<Cell<bool>>,
) -> impl Future<Output = Result<Vec<f32>, Error>> + 'static {
    let (tx, rx) = futures_channel::oneshot::channel();
    staging.map_async(wgpu::MapMode::Read, ..bytes, move |r| {
        let _ = tx.send(r);
    });
    async move {
        let values = match rx.await.map_err(|_| "the map callback was dropped") {
            Ok(Ok(())) => {
                let values = staging
                    .get_mapped_range(..bytes)
                    .map(|v| bytemuck::pod_collect_to_vec(&v))
                    .map_err(Error::from);
                staging.unmap();
                values
            }
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(e.into()),
        };
        reading.set(false);
        values
    }
}
