//! Adversarial losses, penalties and the ACGAN auxiliary loss. All return scalar tensors.
//!
//! - BCE: Goodfellow et al. 2014; G uses the non-saturating form -log D(G(z)).
//! - WGAN: Arjovsky et al. 2017 (weight clipping is applied by the trainer).
//! - WGAN-GP: Gulrajani et al. 2017, lambda E[(||grad D(x_hat)||_2 - 1)^2].
//! - Hinge: Lim & Ye 2017; Miyato et al. 2018.
//! - R1: Mescheder et al. 2018, (gamma/2) E[||grad D(x_real)||^2].

use candle_core::Tensor;

use crate::config::LossKind;
use crate::error::Result;
use crate::grad::{GradMode, input_gradient, per_sample_sq_norm};
use crate::nn::softplus;
pub use crate::nn::{aux_loss, bce_with_logits};

/// Discriminator adversarial loss from logits on real and fake, each (B,).
pub fn d_loss(kind: LossKind, real: &Tensor, fake: &Tensor) -> Result<Tensor> {
    Ok(match kind {
        // -log sigmoid(r) - log(1 - sigmoid(f)) = softplus(-r) + softplus(f)
        LossKind::Bce => (softplus(&real.neg()?)?.mean_all()? + softplus(fake)?.mean_all()?)?,
        LossKind::Wgan | LossKind::WganGp => (fake.mean_all()? - real.mean_all()?)?,
        LossKind::Hinge => {
            (real.neg()?.affine(1.0, 1.0)?.relu()?.mean_all()?
                + fake.affine(1.0, 1.0)?.relu()?.mean_all()?)?
        }
    })
}

/// Generator adversarial loss from D's logits on fakes (B,).
pub fn g_loss(kind: LossKind, fake: &Tensor) -> Result<Tensor> {
    Ok(match kind {
        LossKind::Bce => softplus(&fake.neg()?)?.mean_all()?,
        LossKind::Wgan | LossKind::WganGp | LossKind::Hinge => fake.mean_all()?.neg()?,
    })
}

/// Mode-seeking term (Mao et al. 2019) for a batch whose two halves share conditions:
/// 1 / (mean|x1 - x2| / mean|z1 - z2| + 1e-5), with x = (x1; x2) the images (B, ...) and
/// z = (z1; z2) the latents (B, Z). Small when different latents give different images.
pub fn mode_seeking(x: &Tensor, z: &Tensor) -> Result<Tensor> {
    let h = x.dim(0)? / 2;
    let dx = (x.narrow(0, 0, h)? - x.narrow(0, h, h)?)?
        .abs()?
        .mean_all()?;
    let dz = (z.narrow(0, 0, h)? - z.narrow(0, h, h)?)?
        .abs()?
        .mean_all()?
        .detach();
    Ok((dx / dz)?.affine(1.0, 1e-5)?.recip()?)
}

/// WGAN-GP penalty E[(||grad_x critic(x_hat)||_2 - 1)^2] at x_hat = eps real + (1 - eps) fake,
/// with `eps` of shape (B, 1, 1, 1). `critic` maps images to per-sample values (B,); `mode`
/// is the step's backward mode, which the critic's pass should carry (see
/// [`input_gradient`]). Differentiable with respect to the critic's weights (exact second
/// order).
pub fn gradient_penalty<F>(
    real: &Tensor,
    fake: &Tensor,
    eps: &Tensor,
    mode: &GradMode,
    critic: F,
) -> Result<Tensor>
where
    F: FnOnce(&Tensor) -> Result<Tensor>,
{
    let x_hat = (real.broadcast_mul(eps)? + fake.broadcast_mul(&eps.affine(-1.0, 1.0)?)?)?;
    let (g, _) = input_gradient(&x_hat, mode, critic)?;
    // A tiny epsilon keeps the square root differentiable at a zero gradient.
    let norm = per_sample_sq_norm(&g)?.affine(1.0, 1e-12)?.sqrt()?; // (B,)
    Ok(norm.affine(1.0, -1.0)?.sqr()?.mean_all()?)
}

/// R1 penalty E[||grad_x critic(x_real)||^2] (multiply by gamma / 2 outside); `mode` as for
/// [`gradient_penalty`].
pub fn r1_penalty<F>(real: &Tensor, mode: &GradMode, critic: F) -> Result<Tensor>
where
    F: FnOnce(&Tensor) -> Result<Tensor>,
{
    let (g, _) = input_gradient(real, mode, critic)?;
    Ok(per_sample_sq_norm(&g)?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConditionKind;
    use candle_core::Device;

    fn t(v: &[f64]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }
    fn s(x: Tensor) -> f64 {
        x.to_scalar::<f64>().unwrap()
    }

    #[test]
    fn losses_match_hand_values() {
        let r = t(&[2.0, -1.0]);
        let f = t(&[0.5, -3.0]);
        let sp = |x: f64| (1.0 + x.exp()).ln();
        // BCE D: mean(softplus(-r)) + mean(softplus(f))
        let want = (sp(-2.0) + sp(1.0)) / 2.0 + (sp(0.5) + sp(-3.0)) / 2.0;
        assert!((s(d_loss(LossKind::Bce, &r, &f).unwrap()) - want).abs() < 1e-12);
        // Hinge D: mean(relu(1 - r)) + mean(relu(1 + f)) = (0 + 2)/2 + (1.5 + 0)/2 = 1.75
        assert!((s(d_loss(LossKind::Hinge, &r, &f).unwrap()) - 1.75).abs() < 1e-12);
        // WGAN: mean(f) - mean(r) = -1.25 - 0.5 = -1.75
        assert!((s(d_loss(LossKind::WganGp, &r, &f).unwrap()) + 1.75).abs() < 1e-12);
        // G non-saturating: mean(softplus(-f))
        let want = (sp(-0.5) + sp(3.0)) / 2.0;
        assert!((s(g_loss(LossKind::Bce, &f).unwrap()) - want).abs() < 1e-12);
        // Stable at huge logits (the naive log(sigmoid) form gives inf here).
        let big = t(&[1000.0, -1000.0]);
        let v = s(bce_with_logits(&big, &t(&[0.0, 1.0])).unwrap());
        assert!((v - 1000.0).abs() < 1e-9, "{v}");
    }

    #[test]
    fn mode_seeking_by_hand() {
        // x halves (1, 3) and (2, 1): mean|dx| = (1 + 2)/2 = 1.5; z halves (0) and (2):
        // mean|dz| = 2 -> 1 / (0.75 + 1e-5). Its gradient with respect to x1[0]:
        // -1/(r + eps)^2 * d r/d x1[0] = -1/(0.75+1e-5)^2 * sign(1 - 2) / (2 * 2).
        let x = candle_core::Var::from_tensor(
            &Tensor::new(&[[1.0f64, 3.0], [2.0, 1.0]], &Device::Cpu).unwrap(),
        )
        .unwrap();
        let z = Tensor::new(&[[0.0f64], [2.0]], &Device::Cpu).unwrap();
        let l = mode_seeking(x.as_tensor(), &z).unwrap();
        let r = 0.75 + 1e-5;
        assert!((s(l.clone()) - 1.0 / r).abs() < 1e-12);
        let g = l.backward().unwrap();
        let g: Vec<Vec<f64>> = g.get(x.as_tensor()).unwrap().to_vec2().unwrap();
        assert!((g[0][0] - 1.0 / (r * r) / 4.0).abs() < 1e-9, "{g:?}");
        assert!((g[1][0] + 1.0 / (r * r) / 4.0).abs() < 1e-9, "{g:?}");
    }

    #[test]
    fn aux_cross_entropy() {
        // logits (0, ln 3) target class 1: p1 = 3/4 -> CE = -ln(0.75)
        let l = Tensor::new(&[[0.0f64, 3f64.ln()]], &Device::Cpu).unwrap();
        let tgt = Tensor::new(&[[0.0f64, 1.0]], &Device::Cpu).unwrap();
        let v = s(aux_loss(ConditionKind::OneHot, &l, &tgt).unwrap());
        assert!((v + 0.75f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn penalty_of_linear_critic() {
        // critic(x) = sum(w * x) has gradient w everywhere: GP = (||w|| - 1)^2, R1 = ||w||^2.
        let w = Tensor::new(&[[[[3.0f64, 4.0]]]], &Device::Cpu).unwrap(); // ||w|| = 5
        let real = Tensor::new(&[[[[1.0f64, 2.0]]], [[[0.0, 1.0]]]], &Device::Cpu).unwrap();
        let fake = real.affine(-1.0, 0.0).unwrap();
        let eps = Tensor::new(&[0.3f64, 0.9], &Device::Cpu)
            .unwrap()
            .reshape((2, 1, 1, 1))
            .unwrap();
        let critic =
            |x: &Tensor| -> Result<Tensor> { Ok(x.broadcast_mul(&w)?.flatten_from(1)?.sum(1)?) };
        let gp = s(gradient_penalty(&real, &fake, &eps, &GradMode::new(), critic).unwrap());
        assert!((gp - 16.0).abs() < 1e-9, "{gp}");
        let r1 = s(r1_penalty(&real, &GradMode::new(), critic).unwrap());
        assert!((r1 - 25.0).abs() < 1e-9, "{r1}");
    }
}
