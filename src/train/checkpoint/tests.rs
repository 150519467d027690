//! Resuming gives the weights of an uninterrupted run, bit for bit.

use super::*;
use crate::train::fit::train_language_model;
use crate::train::gpt2::testing::tiny_config;
use crate::train::testing::{tiny_sets, tiny_tokenizer};

fn all_weights(model: &Gpt2) -> Vec<f32> {
    model
        .weights()
        .into_iter()
        .flat_map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

#[test]
fn resumed_language_model_equals_an_uninterrupted_run() {
    let tokenizer = tiny_tokenizer(300);
    let sets = tiny_sets(&tokenizer, 40);
    let config = Gpt2Config { vocab_size: tokenizer.vocab_size(), ..tiny_config() };
    let fresh = |seed| Gpt2::new_random(config.clone(), &Device::Cpu, seed).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Small batches, so the 10 steps cross epochs and the replayed shuffles matter.
    let options = BuildOptions {
        lm_steps: 10,
        lm_batch_tokens: 200,
        lr: 3e-3,
        seed: 11,
        checkpoint_dir: Some(dir.path().to_path_buf()),
        checkpoint_every: 4,
        ..BuildOptions::default()
    };

    let (straight, straight_facts) = train_language_model(&sets, fresh(1), &options).unwrap();
    let expected = all_weights(&straight);
    assert!(dir.path().join("lm-00000008").is_dir(), "the newest mid-run checkpoint is kept");
    assert!(!dir.path().join("lm-00000004").exists(), "older mid-run checkpoints are pruned");

    // Interrupted after step 8: only the mid-run checkpoint is there. Start from other random
    // weights so that nothing but the checkpoint can make the runs agree.
    std::fs::remove_dir_all(dir.path().join("lm-done")).unwrap();
    let resume = BuildOptions { resume: true, ..options.clone() };
    let (resumed, resumed_facts) = train_language_model(&sets, fresh(2), &resume).unwrap();
    assert_eq!(all_weights(&resumed), expected, "resumed weights differ");
    assert_eq!(resumed_facts.tokens, straight_facts.tokens);
    assert_eq!(resumed_facts.first_loss, straight_facts.first_loss);
    assert_eq!(resumed_facts.final_loss, straight_facts.final_loss);

    // A finished phase is restored as it is, without training.
    let (done, _) = train_language_model(&sets, fresh(3), &resume).unwrap();
    assert_eq!(all_weights(&done), expected);

    // Other settings are refused rather than mixed with the saved run.
    let other = BuildOptions { lm_steps: 12, ..resume };
    let Err(err) = train_language_model(&sets, fresh(4), &other) else {
        panic!("a resume with other settings must fail")
    };
    assert!(format!("{:?}", err).contains("Settings"), "{err}");
    let chain = format!("{:#}", anyhow::Error::from(err));
    assert!(chain.contains("lm_steps: 10 -> 12"), "the refusal names the setting: {chain}");
}
