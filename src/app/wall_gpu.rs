//! The sample wall's GPU path: a wgpu paint callback that draws one atlas texture through
//! `shaders/wall.wgsl` (nearest texel fetch, grid lines, variance heat map in alpha).

use std::sync::Arc;

use eframe::egui_wgpu::{self, CallbackTrait, wgpu};
use wgpu::util::DeviceExt;

/// The atlas to draw: RGBA8, `width x height`; alpha holds the heat-map value.
pub struct Atlas {
    /// Changes whenever the pixels change (uploads happen only then).
    pub version: u64,
    pub width: u32,
    pub height: u32,
    pub rgba: Vec<u8>,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Uniforms {
    atlas: [f32; 2],
    grid: [f32; 2],
    rect_px: [f32; 2],
    heat: f32,
    line_px: f32,
    srgb_target: f32,
    _pad: [f32; 3],
}

/// Pipeline and texture, kept in egui_wgpu's callback resources.
pub struct WallRenderer {
    pipeline: wgpu::RenderPipeline,
    layout: wgpu::BindGroupLayout,
    uniforms: wgpu::Buffer,
    bind: Option<(u64, (u32, u32), wgpu::Texture, wgpu::BindGroup)>,
    srgb_target: bool,
}

/// Register the wall pipeline with eframe's wgpu renderer. Returns false when the app does not
/// run on wgpu (the wall then falls back to an egui texture).
pub fn install(rs: Option<&egui_wgpu::RenderState>) -> bool {
    let Some(rs) = rs else { return false };
    let device = &rs.device;
    let shader = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("ganscope wall"),
        source: wgpu::ShaderSource::Wgsl(include_str!("../../shaders/wall.wgsl").into()),
    });
    let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("ganscope wall"),
        entries: &[
            wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::FRAGMENT,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            },
            wgpu::BindGroupLayoutEntry {
                binding: 1,
                visibility: wgpu::ShaderStages::FRAGMENT,
                ty: wgpu::BindingType::Texture {
                    sample_type: wgpu::TextureSampleType::Float { filterable: false },
                    view_dimension: wgpu::TextureViewDimension::D2,
                    multisampled: false,
                },
                count: None,
            },
        ],
    });
    let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some("ganscope wall"),
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let pipeline = device.create_render_pipeline(&wgpu::RenderPipelineDescriptor {
        label: Some("ganscope wall"),
        layout: Some(&pl),
        vertex: wgpu::VertexState {
            module: &shader,
            entry_point: Some("vs_main"),
            buffers: &[],
            compilation_options: Default::default(),
        },
        fragment: Some(wgpu::FragmentState {
            module: &shader,
            entry_point: Some("fs_main"),
            targets: &[Some(rs.target_format.into())],
            compilation_options: Default::default(),
        }),
        primitive: wgpu::PrimitiveState::default(),
        depth_stencil: None,
        multisample: wgpu::MultisampleState::default(),
        multiview_mask: None,
        cache: None,
    });
    let uniforms = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("ganscope wall uniforms"),
        contents: bytemuck::bytes_of(&Uniforms::zeroed_default()),
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
    });
    rs.renderer.write().callback_resources.insert(WallRenderer {
        pipeline,
        layout,
        uniforms,
        bind: None,
        srgb_target: rs.target_format.is_srgb(),
    });
    true
}

impl Uniforms {
    fn zeroed_default() -> Self {
        bytemuck::Zeroable::zeroed()
    }
}

/// One frame's draw of the wall.
pub struct WallCallback {
    pub atlas: Arc<Atlas>,
    pub cols: u32,
    pub rows: u32,
    pub heat: f32,
    /// Grid line width in points.
    pub line_px: f32,
    /// Size of the drawn rectangle in points.
    pub rect_points: [f32; 2],
}

impl CallbackTrait for WallCallback {
    fn prepare(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        screen: &egui_wgpu::ScreenDescriptor,
        _encoder: &mut wgpu::CommandEncoder,
        resources: &mut egui_wgpu::CallbackResources,
    ) -> Vec<wgpu::CommandBuffer> {
        let Some(r) = resources.get_mut::<WallRenderer>() else {
            return vec![];
        };
        let a = &self.atlas;
        if a.width == 0 || a.height == 0 {
            return vec![];
        }
        let fresh = r.bind.as_ref().is_none_or(|b| b.0 != a.version);
        if fresh {
            let same_size = r.bind.as_ref().is_some_and(|b| b.1 == (a.width, a.height));
            if !same_size {
                let texture = device.create_texture(&wgpu::TextureDescriptor {
                    label: Some("ganscope wall atlas"),
                    size: wgpu::Extent3d {
                        width: a.width,
                        height: a.height,
                        depth_or_array_layers: 1,
                    },
                    mip_level_count: 1,
                    sample_count: 1,
                    dimension: wgpu::TextureDimension::D2,
                    format: wgpu::TextureFormat::Rgba8Unorm,
                    usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
                    view_formats: &[],
                });
                let view = texture.create_view(&Default::default());
                let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("ganscope wall"),
                    layout: &r.layout,
                    entries: &[
                        wgpu::BindGroupEntry {
                            binding: 0,
                            resource: r.uniforms.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 1,
                            resource: wgpu::BindingResource::TextureView(&view),
                        },
                    ],
                });
                r.bind = Some((a.version, (a.width, a.height), texture, bind));
            }
            if let Some(b) = r.bind.as_mut() {
                b.0 = a.version;
                queue.write_texture(
                    wgpu::TexelCopyTextureInfo {
                        texture: &b.2,
                        mip_level: 0,
                        origin: wgpu::Origin3d::ZERO,
                        aspect: wgpu::TextureAspect::All,
                    },
                    &a.rgba,
                    wgpu::TexelCopyBufferLayout {
                        offset: 0,
                        bytes_per_row: Some(4 * a.width),
                        rows_per_image: Some(a.height),
                    },
                    wgpu::Extent3d {
                        width: a.width,
                        height: a.height,
                        depth_or_array_layers: 1,
                    },
                );
            }
        }
        let ppp = screen.pixels_per_point;
        let u = Uniforms {
            atlas: [a.width as f32, a.height as f32],
            grid: [self.cols.max(1) as f32, self.rows.max(1) as f32],
            rect_px: [self.rect_points[0] * ppp, self.rect_points[1] * ppp],
            heat: self.heat,
            line_px: self.line_px * ppp,
            srgb_target: if r.srgb_target { 1.0 } else { 0.0 },
            _pad: [0.0; 3],
        };
        queue.write_buffer(&r.uniforms, 0, bytemuck::bytes_of(&u));
        Vec::new()
    }

    fn paint(
        &self,
        info: egui::PaintCallbackInfo,
        pass: &mut wgpu::RenderPass<'static>,
        resources: &egui_wgpu::CallbackResources,
    ) {
        let Some(r) = resources.get::<WallRenderer>() else {
            return;
        };
        let Some((_, _, _, bind)) = &r.bind else {
            return;
        };
        let _ = info;
        pass.set_pipeline(&r.pipeline);
        pass.set_bind_group(0, bind, &[]);
        pass.draw(0..3, 0..1);
    }
}
