//! Choosing the compute device by name, shared by the CLI and the explorer.

use candle_core::Device;

use crate::error::{Error, Result};

fn cuda() -> Result<Device> {
    if !cfg!(feature = "cuda") {
        return Err(Error::Msg(
            "this ganscope binary was built without CUDA support: rebuild it with \
             `cargo build --release --features cuda` (needs the CUDA toolkit), or use --device cpu"
                .into(),
        ));
    }
    let dev = Device::new_cuda(0).map_err(|e| Error::Msg(format!("opening CUDA device 0: {e}")))?;
    if tf32_requested(std::env::var("GANSCOPE_TF32").ok().as_deref()) {
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
    }
    Ok(dev)
}

/// Whether `GANSCOPE_TF32` asks for TF32 tensor-core products in f32 gemms on CUDA (every
/// convolution is one, see `kernels::conv_gemm`): off by default (exact f32, as PyTorch's
/// matmuls); `1` matches PyTorch's default for cuDNN convolutions
/// (`torch.backends.cudnn.allow_tf32 = True`), with a 10-bit mantissa in the products.
fn tf32_requested(v: Option<&str>) -> bool {
    matches!(v.map(str::trim), Some("1" | "true" | "on" | "yes"))
}

fn metal() -> Result<Device> {
    if !cfg!(feature = "metal") {
        return Err(Error::Msg(
            "this ganscope binary was built without Metal support: rebuild it on macOS with \
             `cargo build --release --features metal`, or use --device cpu"
                .into(),
        ));
    }
    Device::new_metal(0).map_err(|e| Error::Msg(format!("opening Metal device 0: {e}")))
}

/// `cpu`, `cuda`, `metal`, or `auto`: the first accelerator this binary was built for that
/// opens, else the CPU; each one that was built but failed to open is reported to `note`.
pub fn open(name: &str, mut note: impl FnMut(String)) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(),
        "metal" => metal(),
        "auto" => {
            for (built, try_open) in [
                (cfg!(feature = "cuda"), cuda as fn() -> Result<Device>),
                (cfg!(feature = "metal"), metal),
            ] {
                if !built {
                    continue;
                }
                match try_open() {
                    Ok(d) => return Ok(d),
                    Err(e) => note(e.to_string()),
                }
            }
            Ok(Device::Cpu)
        }
        other => Err(Error::Config(format!(
            "unknown device `{other}` (cpu, cuda, metal or auto)"
        ))),
    }
}

/// Short device name for logs, cards and the benchmark's lines: cpu, cuda:0, metal:0.
pub fn name(dev: &Device) -> String {
    match dev.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tf32_only_when_asked() {
        for v in [None, Some(""), Some("0"), Some("off"), Some("false")] {
            assert!(!super::tf32_requested(v), "{v:?}");
        }
        for v in ["1", "true", " on", "yes"] {
            assert!(super::tf32_requested(Some(v)), "{v:?}");
        }
    }
}
