//! Measures causal-LM training throughput of the candle GPT-2 on the CPU.
//!
//! `cargo run --release --example train_bench -- [vocab_size] [steps]`; the thread count
//! follows `RAYON_NUM_THREADS` (candle's matmuls) as in the training binary. Uses mimalloc as
//! the global allocator, as `mindstream-train` does: glibc malloc roughly halves the speed.

use std::time::Instant;

use candle_core::{Device, Tensor};
use mimalloc::MiMalloc;
use mindstream::train::gpt2::{Gpt2, Gpt2Config, LmTrainConfig, LmTrainer};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let vocab_size: usize = args.next().map_or(Ok(8192), |a| a.parse())?;
    let steps: usize = args.next().map_or(Ok(10), |a| a.parse())?;
    let (batch, seq) = (16, 128);
    let config = Gpt2Config {
        vocab_size,
        n_positions: 256,
        n_embd: 128,
        n_layer: 2,
        n_head: 4,
        layer_norm_epsilon: 1e-5,
    };

    let device = Device::Cpu;
    let model = Gpt2::new_random(config, &device, 0)?;
    let ids: Vec<u32> = (0..batch * seq).map(|i| ((i * 7919) % vocab_size) as u32).collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &device)?;
    let mask = Tensor::ones((batch, seq), candle_core::DType::U32, &device)?;
    let mut trainer = LmTrainer::new(model.clone(), LmTrainConfig::default())?;

    trainer.step(&ids, &mask)?;
    let start = Instant::now();
    let mut loss = 0.0;
    for _ in 0..steps {
        loss = trainer.step(&ids, &mask)?;
    }
    let train = start.elapsed().as_secs_f64();

    let start = Instant::now();
    for _ in 0..steps {
        model.lm_loss(&ids, &mask)?.to_scalar::<f32>()?;
    }
    let forward = start.elapsed().as_secs_f64();

    let tokens = (steps * batch * seq) as f64;
    println!(
        "vocab {vocab_size}, {} params, batch {batch} x {seq}, {steps} steps: \
         train {:.0} tokens/s ({:.3} s/step, last loss {loss:.3}), forward {:.0} tokens/s",
        model.num_parameters(),
        tokens / train,
        train / steps as f64,
        tokens / forward,
    );
    Ok(())
}
