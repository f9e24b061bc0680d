// The sample wall: one atlas texture (rows x cols cells of w x h pixels) drawn at integer
// zoom with nearest sampling (textureLoad, no filtering), grid lines between cells, and an
// optional heat map of per-pixel variance stored in the atlas' alpha channel.

struct Uniforms {
    // Atlas size in texels.
    atlas: vec2<f32>,
    // Cells per row and per column (cols, rows).
    grid: vec2<f32>,
    // Size of the drawn rectangle in physical pixels.
    rect_px: vec2<f32>,
    // Heat-map opacity (0 = off).
    heat: f32,
    // Grid line width in physical pixels (0 = none).
    line_px: f32,
    // 1 when the render target is an sRGB format (convert our gamma values to linear).
    srgb_target: f32,
    _pad0: f32,
    _pad1: f32,
    _pad2: f32,
};

@group(0) @binding(0) var<uniform> u: Uniforms;
@group(0) @binding(1) var atlas: texture_2d<f32>;

struct VsOut {
    @builtin(position) pos: vec4<f32>,
    @location(0) uv: vec2<f32>,
};

// One triangle covering the viewport (egui sets the viewport to the callback's rect).
@vertex
fn vs_main(@builtin(vertex_index) i: u32) -> VsOut {
    let x = f32((i << 1u) & 2u);
    let y = f32(i & 2u);
    var o: VsOut;
    o.pos = vec4<f32>(x * 2.0 - 1.0, 1.0 - y * 2.0, 0.0, 1.0);
    o.uv = vec2<f32>(x, y);
    return o;
}

// A perceptual-ish ramp: dark blue -> teal -> yellow -> red.
fn heat_color(t: f32) -> vec3<f32> {
    let c0 = vec3<f32>(0.05, 0.05, 0.35);
    let c1 = vec3<f32>(0.0, 0.6, 0.6);
    let c2 = vec3<f32>(0.95, 0.85, 0.1);
    let c3 = vec3<f32>(0.85, 0.1, 0.05);
    if (t < 0.33) {
        return mix(c0, c1, t / 0.33);
    }
    if (t < 0.66) {
        return mix(c1, c2, (t - 0.33) / 0.33);
    }
    return mix(c2, c3, clamp((t - 0.66) / 0.34, 0.0, 1.0));
}

fn to_linear(c: vec3<f32>) -> vec3<f32> {
    let lo = c / 12.92;
    let hi = pow((c + vec3<f32>(0.055)) / 1.055, vec3<f32>(2.4));
    return select(hi, lo, c <= vec3<f32>(0.04045));
}

@fragment
fn fs_main(in: VsOut) -> @location(0) vec4<f32> {
    let uv = clamp(in.uv, vec2<f32>(0.0), vec2<f32>(0.99999));
    let texel = vec2<i32>(floor(uv * u.atlas));
    let s = textureLoad(atlas, texel, 0);
    var rgb = s.rgb;
    if (u.heat > 0.0) {
        rgb = mix(rgb, heat_color(s.a), u.heat);
    }
    // Grid lines: distance (in physical pixels) to the nearest cell border.
    if (u.line_px > 0.0) {
        let cell_px = u.rect_px / u.grid;
        let p = uv * u.rect_px;
        let f = p - floor(p / cell_px) * cell_px;
        let d = min(min(f.x, cell_px.x - f.x), min(f.y, cell_px.y - f.y));
        if (d < max(u.line_px * 0.5, 1.0)) {
            rgb = vec3<f32>(0.12, 0.12, 0.14);
        }
    }
    if (u.srgb_target > 0.5) {
        rgb = to_linear(rgb);
    }
    return vec4<f32>(rgb, 1.0);
}
