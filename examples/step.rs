use candle_core::Tensor;
fn main() -> anyhow::Result<()> {
    let p = supra::io::fetch::default_model_path();
    let loaded = supra::io::load(&p)?;
    let model = supra::model::llama::Llama::new(&loaded.config, &loaded.weights)?;
    let mut cache = model.new_cache();
    let ids: Vec<u32> = (0..100u32).collect();
    let x = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
    let t = std::time::Instant::now();
    let h = model.forward_hidden(&x, Some(&mut cache))?;
    println!("prefill hidden {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let _ = model.logits(&h.narrow(1, 99, 1)?)?;
    println!("logits {:?}", t.elapsed());
    for _ in 0..3 {
        let x = Tensor::new(&[5u32], model.device())?.unsqueeze(0)?;
        let t = std::time::Instant::now();
        let h = model.forward_hidden(&x, Some(&mut cache))?;
        println!("step hidden {:?}", t.elapsed());
        let t = std::time::Instant::now();
        let _ = model.logits(&h)?;
        println!("step logits {:?}", t.elapsed());
    }
    Ok(())
}
