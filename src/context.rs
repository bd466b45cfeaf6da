//! Opening a device for users who have none yet.

use crate::error::{Error, Result};

/// A device and queue opened by [`GpuContext::new`], with the adapter they came from.
///
/// Users with their own `wgpu::Device` and `Queue` do not need this: every function of the
/// crate takes theirs.
#[derive(Debug)]
pub struct GpuContext {
    /// The instance the adapter came from.
    pub instance: wgpu::Instance,
    /// The adapter chosen.
    pub adapter: wgpu::Adapter,
    /// The device, opened with the adapter's own limits (not `Limits::default()`, whose
    /// 256-byte offset alignment and 128 MiB binding cap may be stricter than the adapter's).
    pub device: wgpu::Device,
    /// The device's queue.
    pub queue: wgpu::Queue,
}

/// Features this crate uses where the adapter has them.
pub fn wanted_features() -> wgpu::Features {
    wgpu::Features::IMMEDIATES | wgpu::Features::SHADER_F16 | wgpu::Features::TIMESTAMP_QUERY
}

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

impl GpuContext {
    /// Opens a device: a hardware adapter when there is one, else a software one (Mesa's
    /// lavapipe on Vulkan, llvmpipe on GL). Honours `WGPU_BACKEND` (`vulkan`, `gl`, `metal`,
    /// `dx12`, comma-separated) and `WGPU_ADAPTER_NAME` (a substring of the adapter's name).
    ///
    /// Requests the adapter's limits and, where present, `IMMEDIATES` (per-step values
    /// recorded in the pass), `SHADER_F16` and `TIMESTAMP_QUERY`.
    ///
    /// Blocks; not on the web, where [`new_async`](Self::new_async) opens the browser's
    /// WebGPU adapter (which has no `IMMEDIATES`: steps take the uniform-ring path).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new() -> Result<Self> {
        pollster::block_on(Self::new_async())
    }

    /// [`GpuContext::new`], async.
    pub async fn new_async() -> Result<Self> {
        let desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        let backends = desc.backends;
        let instance = wgpu::Instance::new(desc);
        let mut adapters = instance.enumerate_adapters(backends).await;
        let wanted_name = std::env::var("WGPU_ADAPTER_NAME")
            .ok()
            .map(|s| s.to_lowercase());
        if let Some(name) = &wanted_name {
            adapters.retain(|a| a.get_info().name.to_lowercase().contains(name));
        }
        adapters.sort_by_key(|a| rank(a.get_info().device_type));
        let backends_text = match (std::env::var("WGPU_BACKEND"), &wanted_name) {
            (Ok(b), _) => format!(" for WGPU_BACKEND={b}"),
            (_, Some(n)) => format!(" named like WGPU_ADAPTER_NAME={n}"),
            _ => String::new(),
        };
        let adapter = adapters.into_iter().next().ok_or(Error::NoAdapter {
            backends: backends_text,
        })?;
        let info = adapter.get_info();
        let features = adapter.features() & wanted_features();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("wgpu-ema"),
                required_features: features,
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::RequestDevice {
                adapter: info.name.clone(),
                message: e.to_string(),
            })?;
        Ok(Self {
            instance,
            adapter,
            device,
            queue,
        })
    }

    /// The adapter's description.
    pub fn info(&self) -> wgpu::AdapterInfo {
        self.adapter.get_info()
    }

    /// One line naming the adapter: `"llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan, Cpu)"`.
    pub fn describe(&self) -> String {
        let i = self.info();
        format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
    }

    /// True when the adapter is a software rasterizer (lavapipe, llvmpipe, WARP).
    pub fn is_software(&self) -> bool {
        self.info().device_type == wgpu::DeviceType::Cpu
    }
}
