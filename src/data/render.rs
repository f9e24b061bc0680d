//! A deterministic synthetic i-CLEVR: a small CPU ray caster that draws CLEVR-style scenes
//! (Johnson et al. 2017) so the app has a conditional data set with no files at all.
//!
//! The scene follows CLEVR's: a gray matte floor seen from a camera looking down at about
//! 30 degrees with a 35 mm lens (49 degrees horizontal field of view, 4:3 frame), a large
//! soft key light with fill and back lights and some ambient light, and objects that are
//! cubes, spheres or cylinders in eight colours (CLEVR's RGB values), rubber (matte) or
//! metal (shiny), of one size class (i-CLEVR) with a little size jitter, at random floor
//! positions and rotations about the vertical axis. Objects do not interpenetrate, stay in
//! the frame and are never mostly hidden behind one another.
//!
//! Shading is Lambert diffuse + Blinn-Phong specular; metal adds a reflection of a gray
//! environment; the floor gets soft shadows (8 or 16 shadow rays to a disc light) and
//! contact darkening. Object edges average `supersample`² rays per pixel; the smooth open
//! floor and object interiors take one. Only the pixels an object, its shadow or its contact
//! darkening can reach are traced; the rest is a copy of the empty floor, computed once per
//! [`Renderer`]. The 4:3 frame is always
//! mapped onto the whole output, so a `size` x `size` render is squashed horizontally
//! exactly as the real 320x240 images are by the course's `transforms.Resize((64, 64))`;
//! a 320x240 render is undistorted.
//!
//! Scenes are built step by step like the real set: step `_1` adds one object to step
//! `_0`'s scene (same objects, same places), `_2` one more. Every scene's randomness depends
//! only on (seed, scene index), so data sets are identical for any thread count.

use std::fmt::Write as _;
use std::fs;
use std::ops::{Add, Mul, Neg, Sub};
use std::path::Path;

use super::iclevr::{OBJECT_NAMES, default_object_names, worker_threads};
use super::{ConditionKind, InMemoryDataset, split_step};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// The eight CLEVR colours, in i-CLEVR label order (label id % 8).
pub const COLOUR_NAMES: [&str; 8] = [
    "gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow",
];

/// CLEVR's RGB values for [`COLOUR_NAMES`].
pub const COLOURS: [[u8; 3]; 8] = [
    [87, 87, 87],
    [173, 35, 35],
    [42, 75, 215],
    [29, 105, 20],
    [129, 74, 25],
    [129, 38, 192],
    [41, 208, 208],
    [255, 238, 51],
];

/// The three CLEVR shapes, in i-CLEVR label order (label id / 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    Cube,
    Sphere,
    Cylinder,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Cube, Shape::Sphere, Shape::Cylinder];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Cube => "cube",
            Shape::Sphere => "sphere",
            Shape::Cylinder => "cylinder",
        }
    }
}

/// One object on the floor. Positions are floor coordinates in CLEVR units: `x` to the
/// right, `y` away from the camera, the origin in the middle of the view.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SceneObject {
    /// Index into [`COLOURS`] (0..8).
    pub colour: u8,
    pub shape: Shape,
    pub x: f32,
    pub y: f32,
    /// Rotation about the vertical axis, radians.
    pub yaw: f32,
    /// CLEVR's size `r`: sphere radius; cylinder radius and half-height are `0.9 r`, cube
    /// half-side `0.78 r` (these shapes then look about equally big).
    pub scale: f32,
    pub metal: bool,
}

impl SceneObject {
    /// The i-CLEVR label id (`objects.json` order): `shape * 8 + colour`.
    pub fn label(&self) -> u16 {
        Shape::ALL
            .iter()
            .position(|&s| s == self.shape)
            .unwrap_or(0) as u16
            * 8
            + self.colour as u16
    }

    /// The `objects.json` name, e.g. `"cyan sphere"`.
    pub fn name(&self) -> &'static str {
        OBJECT_NAMES[self.label() as usize]
    }
}

/// Colour index and shape of an i-CLEVR label id (0..24).
pub fn label_parts(label: u16) -> (u8, Shape) {
    assert!(label < 24, "i-CLEVR label {label} out of range 0..24");
    ((label % 8) as u8, Shape::ALL[(label / 8) as usize])
}

/// Rendering quality.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderOptions {
    /// Rays per pixel along each axis at object edges and highlights (1 = no
    /// anti-aliasing). The open floor is smooth and takes one ray per pixel.
    pub supersample: usize,
    /// Shadow rays per floor point; `None`: 8 for outputs up to 128 pixels, 16 above.
    pub shadow_samples: Option<usize>,
}

impl Default for RenderOptions {
    fn default() -> Self {
        Self {
            supersample: 3,
            shadow_samples: None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Vectors, camera, lights.

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct V3 {
    x: f32,
    y: f32,
    z: f32,
}

const fn v3(x: f32, y: f32, z: f32) -> V3 {
    V3 { x, y, z }
}

impl V3 {
    fn dot(self, o: V3) -> f32 {
        self.x * o.x + self.y * o.y + self.z * o.z
    }
    fn cross(self, o: V3) -> V3 {
        v3(
            self.y * o.z - self.z * o.y,
            self.z * o.x - self.x * o.z,
            self.x * o.y - self.y * o.x,
        )
    }
    fn len(self) -> f32 {
        self.dot(self).sqrt()
    }
    fn norm(self) -> V3 {
        self * (1.0 / self.len())
    }
}

impl Add for V3 {
    type Output = V3;
    fn add(self, o: V3) -> V3 {
        v3(self.x + o.x, self.y + o.y, self.z + o.z)
    }
}
impl Sub for V3 {
    type Output = V3;
    fn sub(self, o: V3) -> V3 {
        v3(self.x - o.x, self.y - o.y, self.z - o.z)
    }
}
impl Mul<f32> for V3 {
    type Output = V3;
    fn mul(self, s: f32) -> V3 {
        v3(self.x * s, self.y * s, self.z * s)
    }
}
impl Neg for V3 {
    type Output = V3;
    fn neg(self) -> V3 {
        v3(-self.x, -self.y, -self.z)
    }
}

/// Camera elevation above the floor plane (degrees), distance to the look-at point, and
/// the look-at point's depth.
const CAM_ELEVATION_DEG: f32 = 30.0;
const CAM_DISTANCE: f32 = 11.5;
const CAM_TARGET_Y: f32 = 0.3;
/// tan(horizontal half field of view): a 35 mm lens on a 32 mm sensor (Blender's default).
const TAN_HALF_HFOV: f32 = 16.0 / 35.0;

#[derive(Debug, Clone, Copy)]
struct Camera {
    pos: V3,
    fwd: V3,
    right: V3,
    up: V3,
    tx: f32,
    ty: f32,
}

impl Camera {
    fn clevr() -> Self {
        let e = CAM_ELEVATION_DEG.to_radians();
        let target = v3(0.0, CAM_TARGET_Y, 0.0);
        let pos = target + v3(0.0, -e.cos(), e.sin()) * CAM_DISTANCE;
        let fwd = (target - pos).norm();
        let right = v3(1.0, 0.0, 0.0);
        let up = right.cross(fwd);
        Self {
            pos,
            fwd,
            right,
            up,
            tx: TAN_HALF_HFOV,
            ty: TAN_HALF_HFOV * 0.75,
        }
    }

    /// Unit ray direction through frame point (u, v) in [-1, 1]² (v up).
    fn ray(&self, u: f32, v: f32) -> V3 {
        (self.fwd + self.right * (u * self.tx) + self.up * (v * self.ty)).norm()
    }

    /// Frame coordinates (u, v) of a world point in front of the camera.
    fn project(&self, q: V3) -> (f32, f32) {
        let r = q - self.pos;
        let z = r.dot(self.fwd).max(1e-3);
        (
            r.dot(self.right) / (z * self.tx),
            r.dot(self.up) / (z * self.ty),
        )
    }
}

/// Key light: a disc of radius [`KEY_RADIUS`] at [`KEY_POS`] (front left, high), casting
/// soft shadows to the back right. Fill (front right) and back lights are directional and
/// cast no shadows.
const KEY_POS: V3 = v3(-5.5, -3.0, 8.0);
const KEY_RADIUS: f32 = 1.6;
/// Shadow rays per floor point: [`KEY_SAMPLES`] for outputs over 128 pixels wide or high,
/// [`KEY_SAMPLES_SMALL`] for smaller ones (a pixel there spans more of the penumbra).
const KEY_SAMPLES: usize = 16;
const KEY_SAMPLES_SMALL: usize = 8;
/// Shares of the floor's irradiance at the origin (they sum to 1).
const KEY_SHARE: f32 = 0.62;
const FILL_SHARE: f32 = 0.12;
const BACK_SHARE: f32 = 0.08;
const AMBIENT_SHARE: f32 = 0.18;
/// Floor colour (sRGB gray level) at the origin.
const FLOOR_GRAY: f32 = 128.0;
/// Contact darkening: strength and reach (in object radii).
const AO_STRENGTH: f32 = 0.55;
const AO_RANGE: f32 = 2.0;

#[derive(Debug, Clone)]
struct Lighting {
    key_samples: Vec<V3>,
    key_i: f32,
    fill_dir: V3,
    fill_i: f32,
    back_dir: V3,
    back_i: f32,
    amb_i: f32,
    floor_albedo: f32,
}

impl Lighting {
    fn clevr(samples: usize) -> Self {
        let fill_dir = v3(6.0, -5.0, 4.0).norm();
        let back_dir = v3(1.5, 8.0, 6.0).norm();
        let key_z = KEY_POS.norm().z;
        // A disc facing the scene, sampled on a Vogel spiral.
        let axis = KEY_POS.norm();
        let a = axis.cross(v3(0.0, 0.0, 1.0)).norm();
        let b = axis.cross(a);
        let golden = std::f32::consts::PI * (3.0 - 5f32.sqrt());
        let key_samples = (0..samples.max(1))
            .map(|i| {
                let r = KEY_RADIUS * ((i as f32 + 0.5) / samples.max(1) as f32).sqrt();
                let th = i as f32 * golden;
                KEY_POS + a * (r * th.cos()) + b * (r * th.sin())
            })
            .collect();
        Self {
            key_samples,
            key_i: KEY_SHARE / key_z,
            fill_dir,
            fill_i: FILL_SHARE / fill_dir.z,
            back_dir,
            back_i: BACK_SHARE / back_dir.z,
            amb_i: AMBIENT_SHARE,
            floor_albedo: srgb_to_linear(FLOOR_GRAY / 255.0),
        }
    }

    /// The floor's radiance at `q` from the key light and from everything else, unshadowed.
    fn floor_terms(&self, q: V3) -> (f32, f32) {
        let lk = (KEY_POS - q).norm();
        let rest = self.fill_i * self.fill_dir.z + self.back_i * self.back_dir.z + self.amb_i;
        (
            self.floor_albedo * self.key_i * lk.z,
            self.floor_albedo * rest,
        )
    }

    /// What a metal surface reflects in direction `r`: the floor below the horizon, the
    /// brighter backdrop and sky above it.
    fn environment(&self, r: V3) -> f32 {
        if r.z < 0.0 {
            self.floor_albedo * (0.5 + 0.2 * r.z)
        } else {
            self.floor_albedo * (0.8 + 3.0 * r.z.sqrt())
        }
    }
}

fn srgb_to_linear(c: f32) -> f32 {
    if c <= 0.04045 {
        c / 12.92
    } else {
        ((c + 0.055) / 1.055).powf(2.4)
    }
}

fn linear_to_srgb(c: f32) -> f32 {
    if c <= 0.003_130_8 {
        c * 12.92
    } else {
        1.055 * c.powf(1.0 / 2.4) - 0.055
    }
}

const LUT_SIZE: usize = 4096;

fn srgb_lut() -> Vec<u8> {
    (0..LUT_SIZE)
        .map(|i| {
            let c = linear_to_srgb(i as f32 / (LUT_SIZE - 1) as f32);
            (c * 255.0).round().clamp(0.0, 255.0) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Primitives.

const EPS: f32 = 1e-4;
/// Cube half-side and cylinder radius / half-height, in units of the object's `scale`.
const CUBE_HALF: f32 = 0.78;
const CYL_RADIUS: f32 = 0.9;
const CYL_HALF_HEIGHT: f32 = 0.9;

/// An object prepared for ray casting.
#[derive(Debug, Clone)]
struct Prim {
    shape: Shape,
    /// Centre.
    c: V3,
    cs: f32,
    sn: f32,
    /// Sphere / cylinder radius, cube half-side.
    a: f32,
    /// Cylinder half-height.
    h: f32,
    /// Bounding sphere radius (about `c`) and its square.
    br: f32,
    br2: f32,
    /// Radius of the object's footprint's bounding circle on the floor.
    foot: f32,
    /// Radius used for contact darkening.
    ao_r: f32,
    /// Bounding radius for soft-shadow tests (see [`Prim::shadow_radius`]).
    sr: f32,
    /// Radius of the largest sphere about `c` inside the object.
    r_ins: f32,
    albedo: V3,
    metal: bool,
}

impl Prim {
    fn new(o: &SceneObject) -> Self {
        let r = o.scale;
        let (a, h, br, foot, ao_r) = match o.shape {
            Shape::Sphere => (r, r, r, r, r),
            Shape::Cube => {
                let a = CUBE_HALF * r;
                (a, a, a * 3f32.sqrt(), a * 2f32.sqrt(), a * 1.15)
            }
            Shape::Cylinder => {
                let (a, h) = (CYL_RADIUS * r, CYL_HALF_HEIGHT * r);
                (a, h, (a * a + h * h).sqrt(), a, a * 1.05)
            }
        };
        let c = v3(o.x, o.y, h);
        let rgb = COLOURS[o.colour as usize % 8];
        let albedo = v3(
            srgb_to_linear(rgb[0] as f32 / 255.0),
            srgb_to_linear(rgb[1] as f32 / 255.0),
            srgb_to_linear(rgb[2] as f32 / 255.0),
        );
        let (sn, cs) = o.yaw.sin_cos();
        let mut p = Self {
            shape: o.shape,
            c,
            cs,
            sn,
            a,
            h,
            br,
            br2: br * br,
            foot,
            ao_r,
            sr: 0.0,
            r_ins: match o.shape {
                Shape::Cylinder => a.min(h),
                _ => a,
            },
            albedo,
            metal: o.metal,
        };
        p.sr = p.shadow_radius();
        p
    }

    /// If a ray from a point below the object's top towards any point of the key light's
    /// disc hits the object, the ray towards the disc's centre passes within this distance
    /// of `c`: the sample rays part from it by at most `KEY_RADIUS` per unit of the ray
    /// parameter, and they hit below the top, at a parameter of at most
    /// `top / (KEY_POS.z - KEY_RADIUS)`.
    fn shadow_radius(&self) -> f32 {
        let top = self.c.z + self.br;
        self.br + KEY_RADIUS * top / (KEY_POS.z - KEY_RADIUS) + 0.02
    }

    /// Could a ray from `o` along unit `d` come within `r` of the centre, before `tmax`?
    #[inline]
    fn near_ray(&self, o: V3, d: V3, r2: f32, r: f32, tmax: f32) -> bool {
        let oc = self.c - o;
        let tca = oc.dot(d);
        if tca + r < 0.0 || tca - r > tmax {
            return false;
        }
        oc.dot(oc) - tca * tca <= r2
    }

    /// Nearest hit in (EPS, tmax): distance and world normal.
    #[inline]
    fn intersect(&self, o: V3, d: V3, tmax: f32) -> Option<(f32, V3)> {
        if !self.near_ray(o, d, self.br2, self.br, tmax) {
            return None;
        }
        let l = o - self.c;
        let (t, n) = match self.shape {
            Shape::Sphere => {
                let b = l.dot(d);
                let cc = l.dot(l) - self.a * self.a;
                let disc = b * b - cc;
                if disc < 0.0 {
                    return None;
                }
                let s = disc.sqrt();
                let mut t = -b - s;
                if t <= EPS {
                    t = -b + s;
                }
                (t, (l + d * t) * (1.0 / self.a))
            }
            Shape::Cube => {
                // Into the cube's frame (rotate by -yaw).
                let ol = v3(
                    self.cs * l.x + self.sn * l.y,
                    -self.sn * l.x + self.cs * l.y,
                    l.z,
                );
                let dl = v3(
                    self.cs * d.x + self.sn * d.y,
                    -self.sn * d.x + self.cs * d.y,
                    d.z,
                );
                let a = self.a;
                let slab = |o: f32, d: f32| {
                    let inv = 1.0 / d;
                    let t1 = (-a - o) * inv;
                    let t2 = (a - o) * inv;
                    (t1.min(t2), t1.max(t2))
                };
                let (x0, x1) = slab(ol.x, dl.x);
                let (y0, y1) = slab(ol.y, dl.y);
                let (z0, z1) = slab(ol.z, dl.z);
                let tn = x0.max(y0).max(z0);
                let tf = x1.min(y1).min(z1);
                if tn > tf || tf <= EPS {
                    return None;
                }
                let (t, entering) = if tn > EPS { (tn, true) } else { (tf, false) };
                let (s, axis) = if entering {
                    if tn == x0 {
                        (-dl.x.signum(), 0)
                    } else if tn == y0 {
                        (-dl.y.signum(), 1)
                    } else {
                        (-dl.z.signum(), 2)
                    }
                } else if tf == x1 {
                    (dl.x.signum(), 0)
                } else if tf == y1 {
                    (dl.y.signum(), 1)
                } else {
                    (dl.z.signum(), 2)
                };
                let n = match axis {
                    0 => v3(self.cs * s, self.sn * s, 0.0),
                    1 => v3(-self.sn * s, self.cs * s, 0.0),
                    _ => v3(0.0, 0.0, s),
                };
                (t, n)
            }
            Shape::Cylinder => {
                let mut best = f32::INFINITY;
                let mut n = V3::default();
                let aa = d.x * d.x + d.y * d.y;
                if aa > 1e-12 {
                    let b = l.x * d.x + l.y * d.y;
                    let cc = l.x * l.x + l.y * l.y - self.a * self.a;
                    let disc = b * b - aa * cc;
                    if disc >= 0.0 {
                        let s = disc.sqrt();
                        for t in [(-b - s) / aa, (-b + s) / aa] {
                            let z = l.z + d.z * t;
                            if t > EPS && z.abs() <= self.h && t < best {
                                best = t;
                                n = v3(l.x + d.x * t, l.y + d.y * t, 0.0) * (1.0 / self.a);
                                break;
                            }
                        }
                    }
                }
                if d.z.abs() > 1e-12 {
                    for cap in [self.h, -self.h] {
                        let t = (cap - l.z) / d.z;
                        if t > EPS && t < best {
                            let x = l.x + d.x * t;
                            let y = l.y + d.y * t;
                            if x * x + y * y <= self.a * self.a {
                                best = t;
                                n = v3(0.0, 0.0, cap.signum());
                            }
                        }
                    }
                }
                if !best.is_finite() {
                    return None;
                }
                (best, n)
            }
        };
        (t > EPS && t < tmax).then_some((t, n))
    }
}

/// Fraction of the key light's disc visible from `q` (samples `first..first+count`,
/// wrapping), ignoring object `skip`.
fn key_visibility(q: V3, prims: &[Prim], sel: u64, light: &Lighting) -> f32 {
    // Objects whose shadow cannot reach `q` at all, and objects that hide the whole
    // disc: a ray to a sample point parts from the ray to the disc's centre by at most
    // `KEY_RADIUS` times the fraction of the way to the light, so if the central ray passes
    // close enough to `c`, every sample ray crosses the object's inscribed sphere.
    if sel == 0 {
        return 1.0;
    }
    let lc = KEY_POS - q;
    let dist = lc.len();
    let dc = lc * (1.0 / dist);
    let mut near = 0u64;
    for k in bits(sel) {
        let p = &prims[k];
        if p.near_ray(q, dc, p.sr * p.sr, p.sr, f32::INFINITY) {
            let oc = p.c - q;
            let t0 = oc.dot(dc);
            let d0 = (oc.dot(oc) - t0 * t0).max(0.0).sqrt();
            if t0 > 0.0 && d0 + KEY_RADIUS * t0 / dist <= p.r_ins {
                return 0.0;
            }
            near |= 1 << k;
        }
    }
    if near == 0 {
        return 1.0;
    }
    let mut blocked = 0;
    for &s in &light.key_samples {
        let d = (s - q).norm();
        if bits(near).any(|k| prims[k].intersect(q, d, f32::INFINITY).is_some()) {
            blocked += 1;
        }
    }
    1.0 - blocked as f32 / light.key_samples.len() as f32
}

/// The set bits of `sel`, lowest first.
fn bits(mut sel: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (sel != 0).then(|| {
            let k = sel.trailing_zeros() as usize;
            sel &= sel - 1;
            k
        })
    })
}

/// Contact darkening of the floor at `q` (1 = none).
fn floor_ao(q: V3, prims: &[Prim], sel: u64) -> f32 {
    let mut occ = 0.0;
    for k in bits(sel) {
        let p = &prims[k];
        let dv = p.c - q;
        let d2 = dv.dot(dv);
        let range = AO_RANGE * p.ao_r;
        if d2 >= range * range {
            continue;
        }
        let d = d2.sqrt();
        let w = 1.0 - d / range;
        occ += AO_STRENGTH * (p.ao_r * p.ao_r / d2).min(1.0) * (dv.z / d).max(0.0) * w * w;
    }
    (1.0 - occ).max(0.0)
}

// ---------------------------------------------------------------------------------------
// The renderer.

/// A renderer for one output size: holds the camera, the lights and the empty floor
/// (which every scene shares), so that rendering many scenes only traces the pixels their
/// objects, shadows and contact darkening touch.
#[derive(Debug, Clone)]
pub struct Renderer {
    width: usize,
    height: usize,
    ss: usize,
    cam: Camera,
    light: Lighting,
    lut: Vec<u8>,
    /// Per pixel: where its central ray meets the floor, and the floor's radiance there.
    floor: Vec<FloorPx>,
    /// The floor without objects, CHW.
    background: Vec<u8>,
}

/// The floor seen through a pixel's centre.
#[derive(Debug, Clone, Copy)]
struct FloorPx {
    q: V3,
    /// Key light and other radiance; `key` < 0 marks a ray above the horizon, where `rest`
    /// is the backdrop's radiance.
    key: f32,
    rest: f32,
}

impl FloorPx {
    /// Gray level with the key light's visibility `vis` and contact darkening `ao`.
    fn shade(&self, vis: f32, ao: f32) -> V3 {
        let g = if self.key < 0.0 {
            self.rest
        } else {
            self.key * vis * (0.7 + 0.3 * ao) + self.rest * ao
        };
        v3(g, g, g)
    }
}

/// Inclusive-exclusive pixel rectangle.
#[derive(Debug, Clone, Copy)]
struct Rect {
    x0: usize,
    y0: usize,
    x1: usize,
    y1: usize,
}

impl Rect {
    fn contains(&self, x: usize, y: usize) -> bool {
        x >= self.x0 && x < self.x1 && y >= self.y0 && y < self.y1
    }

    fn overlaps(&self, o: &Rect) -> bool {
        self.x0 < o.x1 && o.x0 < self.x1 && self.y0 < o.y1 && o.y0 < self.y1
    }
}

impl Renderer {
    /// A renderer for `width` x `height` images of the 4:3 frame.
    pub fn new(width: usize, height: usize, opts: RenderOptions) -> Self {
        let mut r = Self {
            width,
            height,
            ss: opts.supersample.max(1),
            cam: Camera::clevr(),
            light: Lighting::clevr(opts.shadow_samples.unwrap_or(if width.max(height) > 128 {
                KEY_SAMPLES
            } else {
                KEY_SAMPLES_SMALL
            })),
            lut: srgb_lut(),
            floor: Vec::with_capacity(width * height),
            background: Vec::new(),
        };
        for y in 0..height {
            for x in 0..width {
                let (u, v) = r.frame_coords(x as f32 + 0.5, y as f32 + 0.5);
                let d = r.cam.ray(u, v);
                let f = if d.z < 0.0 {
                    let q = r.cam.pos + d * (-r.cam.pos.z / d.z);
                    let (key, rest) = r.light.floor_terms(q);
                    FloorPx { q, key, rest }
                } else {
                    FloorPx {
                        q: d,
                        key: -1.0,
                        rest: r.light.environment(d),
                    }
                };
                r.floor.push(f);
            }
        }
        let mut bg = vec![0u8; 3 * width * height];
        for y in 0..height {
            for x in 0..width {
                let c = r.floor[y * width + x].shade(1.0, 1.0);
                r.store(&mut bg, x, y, c);
            }
        }
        r.background = bg;
        r
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    /// Render `objects` as CHW RGB bytes.
    pub fn render(&self, objects: &[SceneObject]) -> Vec<u8> {
        let mut out = vec![0u8; 3 * self.width * self.height];
        self.render_into(objects, &mut out);
        out
    }

    /// Render into `out` (CHW RGB, `3 * width * height` bytes).
    pub fn render_into(&self, objects: &[SceneObject], out: &mut [u8]) {
        assert_eq!(
            out.len(),
            3 * self.width * self.height,
            "output buffer size"
        );
        out.copy_from_slice(&self.background);
        if objects.is_empty() {
            return;
        }
        assert!(objects.len() <= 64, "at most 64 objects per scene");
        let prims: Vec<Prim> = objects.iter().map(Prim::new).collect();
        let rects: Vec<(Rect, Rect)> = prims
            .iter()
            .map(|p| (self.object_rect(p), self.floor_rect(p)))
            .collect();
        // Which objects may show in pixel (x, y), and which may shade its floor.
        let select = |x: usize, y: usize| {
            let (mut obj, mut floor) = (0u64, 0u64);
            for (k, (ro, rf)) in rects.iter().enumerate() {
                obj |= (ro.contains(x, y) as u64) << k;
                floor |= (rf.contains(x, y) as u64) << k;
            }
            (obj, floor)
        };
        let (w, h) = (self.width, self.height);
        // What each pixel's central ray sees: 0 the floor, k + 1 object k.
        let mut ids = vec![0u8; w * h];
        for y in 0..h {
            for x in 0..w {
                let (obj, _) = select(x, y);
                if obj != 0 {
                    let (u, v) = self.frame_coords(x as f32 + 0.5, y as f32 + 0.5);
                    ids[y * w + x] = self.hit_id(self.cam.ray(u, v), &prims, obj);
                }
            }
        }
        for y in 0..h {
            for x in 0..w {
                let (obj, floor) = select(x, y);
                if obj | floor == 0 {
                    continue;
                }
                let id = ids[y * w + x];
                let edge = obj != 0
                    && (y.saturating_sub(1)..(y + 2).min(h)).any(|ny| {
                        (x.saturating_sub(1)..(x + 2).min(w)).any(|nx| ids[ny * w + nx] != id)
                    });
                // The floor is smooth, and so are its shadows and contact darkening: one
                // value per pixel, where the central ray meets the floor (object interiors
                // show no floor).
                let fp = &self.floor[y * w + x];
                let floor_c = if (id == 0 || edge) && fp.key >= 0.0 {
                    let vis = key_visibility(fp.q, &prims, floor, &self.light);
                    fp.shade(vis, floor_ao(fp.q, &prims, floor))
                } else {
                    fp.shade(1.0, 1.0)
                };
                let c = if id == 0 && !edge {
                    floor_c
                } else {
                    // Object interiors are smooth: one ray; edges: supersampled.
                    let n = if edge { self.ss } else { 1 };
                    self.pixel(x, y, &prims, obj, floor_c, n)
                };
                self.store(out, x, y, c);
            }
        }
    }

    /// Which object the ray from the camera along `d` meets first (k + 1), or 0.
    fn hit_id(&self, d: V3, prims: &[Prim], sel: u64) -> u8 {
        let o = self.cam.pos;
        let mut best = if d.z < 0.0 { -o.z / d.z } else { f32::INFINITY };
        let mut id = 0;
        for k in bits(sel) {
            if let Some((t, _)) = prims[k].intersect(o, d, best) {
                best = t;
                id = k as u8 + 1;
            }
        }
        id
    }

    fn frame_coords(&self, px: f32, py: f32) -> (f32, f32) {
        (
            2.0 * px / self.width as f32 - 1.0,
            1.0 - 2.0 * py / self.height as f32,
        )
    }

    fn pixel_rect(&self, pts: impl Iterator<Item = V3>) -> Rect {
        let (mut u0, mut u1, mut v0, mut v1) = (f32::MAX, f32::MIN, f32::MAX, f32::MIN);
        for q in pts {
            let (u, v) = self.cam.project(q);
            u0 = u0.min(u);
            u1 = u1.max(u);
            v0 = v0.min(v);
            v1 = v1.max(v);
        }
        let (w, h) = (self.width as f32, self.height as f32);
        let px = |u: f32| (u + 1.0) * 0.5 * w;
        let py = |v: f32| (1.0 - v) * 0.5 * h;
        let clamp = |x: f32, hi: f32| x.clamp(0.0, hi) as usize;
        Rect {
            x0: clamp(px(u0).floor() - 1.0, w),
            x1: clamp(px(u1).ceil() + 1.0, w),
            y0: clamp(py(v1).floor() - 1.0, h),
            y1: clamp(py(v0).ceil() + 1.0, h),
        }
    }

    /// Pixels the object itself may cover.
    fn object_rect(&self, p: &Prim) -> Rect {
        self.pixel_rect(box_corners(p.c, p.br))
    }

    /// Pixels whose floor its shadow or contact darkening may reach.
    fn floor_rect(&self, p: &Prim) -> Rect {
        let reach = AO_RANGE * p.ao_r;
        let (mut x0, mut x1) = (p.c.x - reach, p.c.x + reach);
        let (mut y0, mut y1) = (p.c.y - reach, p.c.y + reach);
        for q in box_corners(p.c, p.sr) {
            // Project from the key light's centre onto the floor.
            let t = KEY_POS.z / (KEY_POS.z - q.z).max(1e-3);
            let f = KEY_POS + (q - KEY_POS) * t;
            x0 = x0.min(f.x);
            x1 = x1.max(f.x);
            y0 = y0.min(f.y);
            y1 = y1.max(f.y);
        }
        let corners = [
            v3(x0, y0, 0.0),
            v3(x1, y0, 0.0),
            v3(x0, y1, 0.0),
            v3(x1, y1, 0.0),
        ];
        self.pixel_rect(corners.into_iter())
    }

    /// Linear RGB of pixel (x, y): the mean of its supersamples.
    /// Mean of pixel (x, y)'s n x n rays; `floor_c` is the pixel's floor colour.
    fn pixel(&self, x: usize, y: usize, prims: &[Prim], sel: u64, floor_c: V3, n: usize) -> V3 {
        let inv = 1.0 / n as f32;
        let mut acc = V3::default();
        // Shadows cast on objects by other objects, once per pixel and object.
        let mut obj_vis = [f32::NAN; 8];
        for j in 0..n {
            for i in 0..n {
                let (u, v) = self.frame_coords(
                    x as f32 + (i as f32 + 0.5) * inv,
                    y as f32 + (j as f32 + 0.5) * inv,
                );
                let d = self.cam.ray(u, v);
                acc = acc + self.trace(d, prims, sel, floor_c, &mut obj_vis);
            }
        }
        acc * (inv * inv)
    }

    fn store(&self, out: &mut [u8], x: usize, y: usize, c: V3) {
        let hw = self.width * self.height;
        let o = y * self.width + x;
        let q = |v: f32| self.lut[(v.clamp(0.0, 1.0) * (LUT_SIZE - 1) as f32 + 0.5) as usize];
        out[o] = q(c.x);
        out[hw + o] = q(c.y);
        out[2 * hw + o] = q(c.z);
    }

    /// Radiance along a camera ray; `sample` picks this subsample's share of the light's
    /// shadow samples.
    fn trace(&self, d: V3, prims: &[Prim], sel: u64, floor_c: V3, obj_vis: &mut [f32; 8]) -> V3 {
        let o = self.cam.pos;
        let t_floor = if d.z < 0.0 { -o.z / d.z } else { f32::INFINITY };
        let mut best = t_floor;
        let mut hit = None;
        for k in bits(sel) {
            if let Some((t, n)) = prims[k].intersect(o, d, best) {
                best = t;
                hit = Some((k, n));
            }
        }
        match hit {
            Some((k, n)) => self.shade_object(o + d * best, n, d, k, prims, obj_vis),
            None => floor_c,
        }
    }

    fn shade_object(
        &self,
        p: V3,
        n: V3,
        d: V3,
        k: usize,
        prims: &[Prim],
        obj_vis: &mut [f32; 8],
    ) -> V3 {
        let lt = &self.light;
        let prim = &prims[k];
        let view = -d;
        let lk = (KEY_POS - p).norm();
        let ndl = n.dot(lk);
        let vis = if ndl > 0.0 && prims.len() > 1 {
            match obj_vis.get(k) {
                Some(v) if !v.is_nan() => *v,
                _ => {
                    let others = (u64::MAX >> (64 - prims.len())) & !(1 << k);
                    let v = key_visibility(p + n * 1e-3, prims, others, lt);
                    if let Some(slot) = obj_vis.get_mut(k) {
                        *slot = v;
                    }
                    v
                }
            }
        } else {
            1.0
        };
        let key = lt.key_i * vis;
        let diffuse = key * ndl.max(0.0)
            + lt.fill_i * n.dot(lt.fill_dir).max(0.0)
            + lt.back_i * n.dot(lt.back_dir).max(0.0)
            + lt.amb_i * (0.55 + 0.45 * n.z);
        // Blinn-Phong with exponent 2^k, by squaring.
        let blinn = |l: V3, k: u32| {
            let hv = (l + view).norm();
            let mut s = n.dot(hv).max(0.0);
            for _ in 0..k {
                s *= s;
            }
            s
        };
        if prim.metal {
            let dn = d.dot(n);
            let r = d - n * (2.0 * dn);
            // Reflection grows towards grazing angles (Schlick).
            let f = 0.75 + 0.25 * (1.0 + dn).clamp(0.0, 1.0).powi(5);
            let env = lt.environment(r) * f;
            let spec = key * blinn(lk, 7) * 9.0 + lt.fill_i * blinn(lt.fill_dir, 6) * 2.0;
            let tint = prim.albedo * 0.75 + v3(0.25, 0.25, 0.25);
            prim.albedo * (0.15 * diffuse) + prim.albedo * (env * 2.6) + tint * spec
        } else {
            let spec = key * blinn(lk, 4) * 0.12 + lt.fill_i * blinn(lt.fill_dir, 4) * 0.05;
            prim.albedo * diffuse + v3(spec, spec, spec)
        }
    }
}

/// The 8 corners of the cube of half-side `r` about `c`.
fn box_corners(c: V3, r: f32) -> impl Iterator<Item = V3> {
    (0..8).map(move |i| {
        let s = |bit: usize| if i & bit != 0 { r } else { -r };
        c + v3(s(1), s(2), s(4))
    })
}

/// Render `objects` as a `size` x `size` CHW RGB image (the 4:3 frame squashed to a square,
/// as the real pipeline resizes it).
pub fn render_scene(objects: &[SceneObject], size: usize, opts: RenderOptions) -> Vec<u8> {
    Renderer::new(size, size, opts).render(objects)
}

/// Render `objects` as a `width` x `height` CHW RGB image of the 4:3 frame (320x240 gives
/// the real images' undistorted view).
pub fn render_frame(
    objects: &[SceneObject],
    width: usize,
    height: usize,
    opts: RenderOptions,
) -> Vec<u8> {
    Renderer::new(width, height, opts).render(objects)
}

// ---------------------------------------------------------------------------------------
// Placement.

/// The object size class and its relative jitter.
pub const BASE_SCALE: f32 = 0.75;
pub const SCALE_JITTER: f32 = 0.08;
/// Floor region objects are placed in.
const REGION_X: (f32, f32) = (-3.4, 3.4);
const REGION_Y: (f32, f32) = (-2.6, 3.6);
/// Least gap between footprints.
const MIN_GAP: f32 = 0.15;
/// Frame margin (in [-1, 1] frame units) the object's bounding box must keep.
const FRAME_MARGIN: f32 = 0.04;
/// Visibility test grid, and what share of an object's pixels must stay visible.
const VIS_W: usize = 96;
const VIS_H: usize = 72;
const MIN_VISIBLE_SHARE: f32 = 0.55;
const MIN_VISIBLE_PIXELS: usize = 12;
const PLACEMENT_TRIES: usize = 400;

/// Pixels of each object visible from the camera on a `width` x `height` grid of the 4:3
/// frame (one ray per pixel centre).
pub fn visible_pixels(objects: &[SceneObject], width: usize, height: usize) -> Vec<usize> {
    let cam = Camera::clevr();
    let prims: Vec<Prim> = objects.iter().map(Prim::new).collect();
    visible_counts(&cam, &prims, width, height)
}

/// The pixels of a `w` x `h` grid of the frame that object `p` may cover.
fn grid_rect(cam: &Camera, p: &Prim, w: usize, h: usize) -> Rect {
    let (mut u0, mut u1, mut v0, mut v1) = (f32::MAX, f32::MIN, f32::MAX, f32::MIN);
    for q in box_corners(p.c, p.br) {
        let (u, v) = cam.project(q);
        u0 = u0.min(u);
        u1 = u1.max(u);
        v0 = v0.min(v);
        v1 = v1.max(v);
    }
    let px = |u: f32| ((u + 1.0) * 0.5 * w as f32).clamp(0.0, w as f32);
    let py = |v: f32| ((1.0 - v) * 0.5 * h as f32).clamp(0.0, h as f32);
    Rect {
        x0: px(u0).floor() as usize,
        x1: px(u1).ceil() as usize,
        y0: py(v1).floor() as usize,
        y1: py(v0).ceil() as usize,
    }
}

fn visible_counts(cam: &Camera, prims: &[Prim], w: usize, h: usize) -> Vec<usize> {
    let mut counts = vec![0; prims.len()];
    // Only pixels inside some object's box can show an object.
    let (mut x0, mut x1, mut y0, mut y1) = (w, 0, h, 0);
    for p in prims {
        let r = grid_rect(cam, p, w, h);
        x0 = x0.min(r.x0);
        x1 = x1.max(r.x1);
        y0 = y0.min(r.y0);
        y1 = y1.max(r.y1);
    }
    for y in y0..y1 {
        for x in x0..x1 {
            let u = 2.0 * (x as f32 + 0.5) / w as f32 - 1.0;
            let v = 1.0 - 2.0 * (y as f32 + 0.5) / h as f32;
            let d = cam.ray(u, v);
            let mut best = f32::INFINITY;
            let mut hit = None;
            for (k, p) in prims.iter().enumerate() {
                if let Some((t, _)) = p.intersect(cam.pos, d, best) {
                    best = t;
                    hit = Some(k);
                }
            }
            if let Some(k) = hit {
                counts[k] += 1;
            }
        }
    }
    counts
}

fn in_frame(cam: &Camera, p: &Prim) -> bool {
    let lim = 1.0 - FRAME_MARGIN;
    // The object's own box (tighter than its bounding sphere's for flat shapes).
    box_corners(v3(p.c.x, p.c.y, p.c.z), p.br).all(|q| {
        let (u, v) = cam.project(q);
        u.abs() <= lim && v.abs() <= lim
    })
}

/// Add an object with label `label` (0..24) to `objects` at a random free place, with a
/// random yaw, size jitter and material, such that it does not touch the others, stays in
/// the frame, and neither it nor any earlier object is mostly hidden. The earlier objects
/// do not move.
pub fn add_object(rng: &mut Rng, objects: &mut Vec<SceneObject>, label: u16) {
    let (colour, shape) = label_parts(label);
    let cam = Camera::clevr();
    let mut prims: Vec<Prim> = objects.iter().map(Prim::new).collect();
    let boxes: Vec<Rect> = prims
        .iter()
        .map(|p| grid_rect(&cam, p, VIS_W, VIS_H))
        .collect();
    // Unoccluded pixel counts of the earlier objects, computed when first needed.
    let mut alone: Vec<usize> = Vec::new();
    let mut best: Option<(f32, SceneObject)> = None;
    for _ in 0..PLACEMENT_TRIES {
        let o = SceneObject {
            colour,
            shape,
            x: REGION_X.0 + (REGION_X.1 - REGION_X.0) * rng.uniform() as f32,
            y: REGION_Y.0 + (REGION_Y.1 - REGION_Y.0) * rng.uniform() as f32,
            yaw: std::f32::consts::TAU * rng.uniform() as f32,
            scale: BASE_SCALE * (1.0 + SCALE_JITTER * (2.0 * rng.uniform() as f32 - 1.0)),
            metal: rng.uniform() < 0.5,
        };
        let p = Prim::new(&o);
        if !in_frame(&cam, &p) {
            continue;
        }
        let apart = prims.iter().all(|q| {
            let dx = p.c.x - q.c.x;
            let dy = p.c.y - q.c.y;
            (dx * dx + dy * dy).sqrt() >= p.foot + q.foot + MIN_GAP
        });
        if !apart {
            continue;
        }
        // Objects whose boxes do not overlap cannot hide one another.
        let b = grid_rect(&cam, &p, VIS_W, VIS_H);
        if !boxes.iter().any(|q| q.overlaps(&b)) {
            objects.push(o);
            return;
        }
        // Visibility, as a share of each object's unoccluded pixels.
        if alone.is_empty() {
            alone = prims
                .iter()
                .map(|p| visible_counts(&cam, std::slice::from_ref(p), VIS_W, VIS_H)[0])
                .collect();
        }
        let own = visible_counts(&cam, std::slice::from_ref(&p), VIS_W, VIS_H)[0];
        prims.push(p);
        let counts = visible_counts(&cam, &prims, VIS_W, VIS_H);
        prims.pop();
        let mut worst = f32::INFINITY;
        let mut enough = true;
        for (k, &c) in counts.iter().enumerate() {
            let full = if k < alone.len() { alone[k] } else { own };
            worst = worst.min(c as f32 / full.max(1) as f32);
            enough &= c >= MIN_VISIBLE_PIXELS;
        }
        if enough && worst >= MIN_VISIBLE_SHARE {
            objects.push(o);
            return;
        }
        if best.as_ref().is_none_or(|(s, _)| worst > *s) {
            best = Some((worst, o));
        }
    }
    // Crowded: the least hidden candidate found (or, failing all, the middle of the view).
    let o = best.map(|(_, o)| o).unwrap_or(SceneObject {
        colour,
        shape,
        x: 0.0,
        y: 0.0,
        yaw: 0.0,
        scale: BASE_SCALE,
        metal: false,
    });
    objects.push(o);
}

/// Place objects for `labels` (ids 0..24, in order), each added as by [`add_object`].
pub fn sample_scene(rng: &mut Rng, labels: &[u16]) -> Vec<SceneObject> {
    let mut objects = Vec::with_capacity(labels.len());
    for &l in labels {
        add_object(rng, &mut objects, l);
    }
    objects
}

// ---------------------------------------------------------------------------------------
// Data sets.

/// Objects per synthetic scene (steps `_0`, `_1`, `_2`).
pub const STEPS: usize = 3;

/// The random stream of scene `index` for data set `seed`.
fn scene_rng(seed: u64, index: usize) -> Rng {
    let base = Rng::stream(seed, "ganscope.render.scene").next_u64();
    Rng::new(base ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// One scene to render: its images' positions in the output and their label sets, in
/// step order.
#[derive(Debug, Clone)]
struct SceneJob {
    index: usize,
    steps: Vec<(usize, Vec<u16>)>,
}

/// The scenes of a label list: entries grouped by scene prefix (first appearance order),
/// steps sorted; only the first `n_scenes` scenes. Returns the jobs and the kept entries'
/// indices into `label_sets` (in their original order).
fn group_scenes(label_sets: &[(String, Vec<u16>)], n_scenes: usize) -> (Vec<SceneJob>, Vec<usize>) {
    let mut order: Vec<&str> = Vec::new();
    let mut groups: std::collections::HashMap<&str, Vec<(usize, usize)>> = Default::default();
    for (i, (file, _)) in label_sets.iter().enumerate() {
        let (key, step) = split_step(file).unwrap_or((file.as_str(), 0));
        let g = groups.entry(key).or_default();
        if g.is_empty() {
            order.push(key);
        }
        g.push((step, i));
    }
    order.truncate(n_scenes);
    let mut kept: Vec<usize> = order
        .iter()
        .flat_map(|k| groups[k].iter().map(|&(_, i)| i))
        .collect();
    kept.sort_unstable();
    // Output position of each kept entry.
    let mut pos = vec![usize::MAX; label_sets.len()];
    for (o, &i) in kept.iter().enumerate() {
        pos[i] = o;
    }
    let jobs = order
        .iter()
        .enumerate()
        .map(|(index, k)| {
            let mut g = groups[k].clone();
            g.sort_by_key(|&(step, i)| (step, i));
            SceneJob {
                index,
                steps: g
                    .into_iter()
                    .map(|(_, i)| (pos[i], label_sets[i].1.clone()))
                    .collect(),
            }
        })
        .collect();
    (jobs, kept)
}

/// `n_scenes` scenes of [`STEPS`] distinct uniformly drawn objects each.
fn sampled_scenes(n_scenes: usize, seed: u64) -> Vec<SceneJob> {
    (0..n_scenes)
        .map(|index| {
            let mut rng = Rng::stream(seed, "ganscope.render.labels");
            // Independent per scene: derive from (seed, index) only.
            rng = Rng::new(rng.next_u64() ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
            let mut pool: Vec<u16> = (0..24).collect();
            let mut labels = Vec::with_capacity(STEPS);
            for _ in 0..STEPS {
                labels.push(pool.swap_remove(rng.below(pool.len())));
            }
            SceneJob {
                index,
                steps: (0..STEPS)
                    .map(|s| (index * STEPS + s, labels[..=s].to_vec()))
                    .collect(),
            }
        })
        .collect()
}

/// The objects of each of a scene's steps: each step keeps the previous step's objects
/// whose labels it still lists (same places) and adds objects for its new labels.
fn scene_steps(seed: u64, job: &SceneJob) -> Vec<Vec<SceneObject>> {
    let mut rng = scene_rng(seed, job.index);
    let mut objects: Vec<SceneObject> = Vec::new();
    let mut steps = Vec::with_capacity(job.steps.len());
    for (_, labels) in &job.steps {
        objects.retain(|o| labels.contains(&o.label()));
        for &l in labels {
            if !objects.iter().any(|o| o.label() == l) {
                add_object(&mut rng, &mut objects, l);
            }
        }
        steps.push(objects.clone());
    }
    steps
}

fn render_job(r: &Renderer, seed: u64, job: &SceneJob, outs: &mut [(usize, &mut [u8])]) {
    for ((pos, _), objects) in job.steps.iter().zip(scene_steps(seed, job)) {
        if let Some((_, o)) = outs.iter_mut().find(|(p, _)| p == pos) {
            r.render_into(&objects, o);
        }
    }
}

/// A scene job with its images' output positions and buffers.
type Work<'a, 'b> = (&'a SceneJob, Vec<(usize, &'b mut [u8])>);

/// Render scene jobs into an image buffer of `n_images`, on `threads` threads.
fn render_jobs(
    jobs: &[SceneJob],
    n_images: usize,
    size: usize,
    seed: u64,
    threads: usize,
    opts: RenderOptions,
) -> Vec<u8> {
    let r = Renderer::new(size, size, opts);
    let len = 3 * size * size;
    let mut pixels = vec![0u8; n_images * len];
    // Hand each job the output slices of its images.
    let mut slots: Vec<Option<&mut [u8]>> = pixels.chunks_mut(len).map(Some).collect();
    let mut work: Vec<Work> = jobs
        .iter()
        .map(|j| {
            let outs = j
                .steps
                .iter()
                .map(|(pos, _)| (*pos, slots[*pos].take().expect("each image rendered once")))
                .collect();
            (j, outs)
        })
        .collect();
    let threads = threads.clamp(1, work.len().max(1));
    let per = work.len().div_ceil(threads).max(1);
    let r = &r;
    std::thread::scope(|s| {
        for chunk in work.chunks_mut(per) {
            s.spawn(move || {
                for (job, outs) in chunk.iter_mut() {
                    render_job(r, seed, job, outs);
                }
            });
        }
    });
    pixels
}

/// What a synthetic data set is made of: file names (real ones, or generated like the real
/// set's) and label sets, in output order.
fn plan(
    n_scenes: usize,
    seed: u64,
    label_sets: Option<&[(String, Vec<u16>)]>,
) -> (Vec<SceneJob>, Vec<(String, Vec<u16>)>) {
    match label_sets {
        Some(sets) => {
            let (jobs, kept) = group_scenes(sets, n_scenes);
            let entries = kept.iter().map(|&i| sets[i].clone()).collect();
            (jobs, entries)
        }
        None => {
            let jobs = sampled_scenes(n_scenes, seed);
            let mut entries = Vec::with_capacity(n_scenes * STEPS);
            for j in &jobs {
                for (s, (_, labels)) in j.steps.iter().enumerate() {
                    entries.push((
                        format!("CLEVR_train_{:06}_{s}.png", j.index),
                        labels.clone(),
                    ));
                }
            }
            (jobs, entries)
        }
    }
}

/// The objects of every image of [`synthetic_dataset`]`(n_scenes, _, seed, label_sets)`, in
/// the same order (placement only, no rendering).
pub fn synthetic_objects(
    n_scenes: usize,
    seed: u64,
    label_sets: Option<&[(String, Vec<u16>)]>,
) -> Vec<Vec<SceneObject>> {
    let (jobs, entries) = plan(n_scenes, seed, label_sets);
    let mut out = vec![Vec::new(); entries.len()];
    for job in &jobs {
        for ((pos, _), objects) in job.steps.iter().zip(scene_steps(seed, job)) {
            out[*pos] = objects;
        }
    }
    out
}

/// A synthetic i-CLEVR set of `size` x `size` images, on all cores; see
/// [`synthetic_dataset_with`].
pub fn synthetic_dataset(
    n_scenes: usize,
    size: usize,
    seed: u64,
    label_sets: Option<&[(String, Vec<u16>)]>,
) -> InMemoryDataset {
    synthetic_dataset_with(
        n_scenes,
        size,
        seed,
        label_sets,
        worker_threads(),
        RenderOptions::default(),
    )
}

/// A synthetic i-CLEVR set of `size` x `size` images (multi-hot over the 24
/// [`OBJECT_NAMES`]).
///
/// Without `label_sets`: `n_scenes` scenes of three distinct uniformly drawn objects, each
/// given as its three steps `_0`, `_1`, `_2` (one, two, three objects): `3 * n_scenes`
/// images. With `label_sets` (e.g. the real `train.json` from
/// [`read_train_labels`](super::iclevr::read_train_labels)): the entries of its first
/// `n_scenes` scenes (entries grouped by the `_<step>.png` suffix of their file names), in
/// `label_sets` order, each scene's steps built on one another.
///
/// The result depends only on the arguments other than `threads`. Panics if a label set
/// holds an id of 24 or more ([`write_iclevr_folder`] checks and returns an error).
pub fn synthetic_dataset_with(
    n_scenes: usize,
    size: usize,
    seed: u64,
    label_sets: Option<&[(String, Vec<u16>)]>,
    threads: usize,
    opts: RenderOptions,
) -> InMemoryDataset {
    let (jobs, entries) = plan(n_scenes, seed, label_sets);
    let pixels = render_jobs(&jobs, entries.len(), size, seed, threads, opts);
    InMemoryDataset {
        source: format!("synthetic i-CLEVR (seed {seed}, {} scenes)", jobs.len()),
        channels: 3,
        height: size,
        width: size,
        pixels,
        kind: ConditionKind::MultiHot,
        label_names: default_object_names(),
        steps: super::scene_steps(&entries),
        labels: entries.into_iter().map(|(_, l)| l).collect(),
    }
}

/// Write a synthetic set as an i-CLEVR folder: `size` x `size` PNGs named like the real
/// ones (`CLEVR_train_000123_0.png`, or `label_sets`' names), `train.json` and
/// `objects.json`, so that [`load_iclevr`](super::iclevr::load_iclevr)`(out, size)` reads it
/// back. Returns the number of images.
pub fn write_iclevr_folder(
    out: &Path,
    n_scenes: usize,
    size: usize,
    seed: u64,
    label_sets: Option<&[(String, Vec<u16>)]>,
) -> Result<usize> {
    for (file, labels) in label_sets.unwrap_or(&[]) {
        if file.is_empty() || file.contains(['/', '\\']) || file == ".." {
            return Err(Error::Msg(format!("`{file}` is not a plain file name")));
        }
        if let Some(l) = labels.iter().find(|&&l| l >= 24) {
            return Err(Error::Msg(format!("{file}: label {l} out of range 0..24")));
        }
    }
    fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let (jobs, entries) = plan(n_scenes, seed, label_sets);
    let pixels = render_jobs(
        &jobs,
        entries.len(),
        size,
        seed,
        worker_threads(),
        RenderOptions::default(),
    );
    let len = 3 * size * size;
    let hw = size * size;
    for ((file, _), img) in entries.iter().zip(pixels.chunks(len)) {
        let rgb = image::RgbImage::from_fn(size as u32, size as u32, |x, y| {
            let o = y as usize * size + x as usize;
            image::Rgb([img[o], img[hw + o], img[2 * hw + o]])
        });
        let path = out.join(file);
        rgb.save_with_format(&path, image::ImageFormat::Png)
            .map_err(|e| Error::Msg(format!("{}: cannot write PNG: {e}", path.display())))?;
    }
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut train = String::from("{\n");
    for (i, (file, labels)) in entries.iter().enumerate() {
        let names: Vec<String> = labels
            .iter()
            .map(|&l| q(OBJECT_NAMES[l as usize]))
            .collect();
        let sep = if i + 1 < entries.len() { "," } else { "" };
        let _ = writeln!(train, "    {}: [{}]{sep}", q(file), names.join(", "));
    }
    train.push_str("}\n");
    let objects: Vec<String> = OBJECT_NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{}: {i}", q(n)))
        .collect();
    let objects = format!("{{{}}}\n", objects.join(", "));
    for (name, text) in [("train.json", train), ("objects.json", objects)] {
        let p = out.join(name);
        fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
    }
    Ok(entries.len())
}

#[cfg(test)]
mod tests;
