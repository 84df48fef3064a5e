use candle_core::{Device, Tensor};
fn main() -> anyhow::Result<()> {
    let d = Device::Cpu;
    for (m, k, n) in [(1, 576, 49152), (1, 576, 1536), (1, 1536, 576), (512, 576, 1536)] {
        let x = Tensor::randn(0f32, 1., (m, k), &d)?;
        let w = Tensor::randn(0f32, 1., (n, k), &d)?;
        let wt = w.t()?.contiguous()?;
        for (name, rhs) in [("w.t()", w.t()?), ("contig", wt.clone())] {
            let _ = x.matmul(&rhs)?;
            let t = std::time::Instant::now();
            for _ in 0..10 { let _ = x.matmul(&rhs)?; }
            let s = t.elapsed().as_secs_f64() / 10.0;
            println!("{m}x{k}x{n} {name}: {:.3} ms  {:.1} GFLOP/s", s * 1e3, 2.0 * (m * k * n) as f64 / s / 1e9);
        }
    }
    Ok(())
}
