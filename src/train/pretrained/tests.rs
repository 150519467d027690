//! A checkpoint in the exact layout of a Hugging Face `GPT2LMHeadModel` save, written by the
//! test: loaded as `--init-from` loads it, trained a few steps, exported, and the ONNX graph
//! checked against the candle forward pass.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use ort::value::Tensor as OrtTensor;

use super::*;
use crate::model::runtime;
use crate::train::build::BuildOptions;
use crate::train::export::{export_onnx, ExportMeta};
use crate::train::gpt2::testing::max_abs_diff;
use crate::train::gpt2::{pool, Heads};
use crate::train::testing::{tiny_sets, tiny_tokenizer};

fn tiny_config(vocab_size: usize) -> Gpt2Config {
    Gpt2Config {
        vocab_size,
        n_positions: 48,
        n_embd: 32,
        n_layer: 2,
        n_head: 4,
        layer_norm_epsilon: 1e-5,
    }
}

/// `config.json` as `transformers` writes it for a GPT-2, with keys this model ignores.
fn hf_config_json(config: &Gpt2Config) -> String {
    serde_json::json!({
        "_name_or_path": "tiny-gpt2",
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "bos_token_id": 0,
        "embd_pdrop": 0.1,
        "eos_token_id": 0,
        "initializer_range": 0.02,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "model_type": "gpt2",
        "n_ctx": config.n_positions,
        "n_embd": config.n_embd,
        "n_head": config.n_head,
        "n_inner": null,
        "n_layer": config.n_layer,
        "n_positions": config.n_positions,
        "reorder_and_upcast_attn": false,
        "resid_pdrop": 0.1,
        "scale_attn_weights": true,
        "summary_type": "cls_index",
        "torch_dtype": "float32",
        "transformers_version": "4.44.0",
        "use_cache": true,
        "vocab_size": config.vocab_size
    })
    .to_string()
}

/// Writes a Hugging Face GPT-2 folder with `model`'s weights: `transformer.`-prefixed names,
/// the causal-mask buffers, and a tied `lm_head.weight`.
fn write_hf_checkpoint(dir: &Path, model: &Gpt2, tokenizer: &TextTokenizer) {
    let config = model.config();
    let mut tensors: HashMap<String, Tensor> =
        model.weights().into_iter().map(|(name, t)| (format!("transformer.{name}"), t)).collect();
    let p = config.n_positions;
    let causal: Vec<u8> = (0..p * p).map(|i| u8::from(i % p <= i / p)).collect();
    let causal = Tensor::from_vec(causal, (1, 1, p, p), &Device::Cpu).unwrap();
    for layer in 0..config.n_layer {
        tensors.insert(format!("transformer.h.{layer}.attn.bias"), causal.clone());
        let masked = Tensor::new(-1e4f32, &Device::Cpu).unwrap();
        tensors.insert(format!("transformer.h.{layer}.attn.masked_bias"), masked);
    }
    tensors.insert("lm_head.weight".into(), model.weight("wte.weight").unwrap());
    candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE)).unwrap();
    std::fs::write(dir.join(CONFIG_FILE), hf_config_json(config)).unwrap();
    tokenizer.inner().save(dir.join(TOKENIZER_FILE), false).unwrap();
}

#[test]
fn hugging_face_checkpoint_trains_and_exports_to_a_matching_graph() {
    let tokenizer = tiny_tokenizer(320);
    let config = tiny_config(tokenizer.vocab_size());
    let original = Gpt2::new_random(config, &Device::Cpu, 5).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_hf_checkpoint(dir.path(), &original, &tokenizer);

    let loaded = load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(loaded.model.config(), original.config());
    assert_eq!(loaded.tokenizer_source, dir.path().join(TOKENIZER_FILE));
    let wte = |m: &Gpt2| m.weight("wte.weight").unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(max_abs_diff(&wte(&loaded.model), &wte(&original)), 0.0);

    let mut sets = tiny_sets(&loaded.tokenizer, 24);
    crate::train::build::encode_sets(&mut sets, &loaded.tokenizer, 40).unwrap();
    let options = BuildOptions {
        lm_steps: 3,
        finetune_steps: 3,
        lm_batch_tokens: 256,
        seed: 3,
        ..BuildOptions::default()
    };
    let (model, lm) =
        crate::train::fit::train_language_model(&sets, loaded.model, &options).unwrap();
    assert_eq!(lm.steps, 3);
    let tuned = crate::train::finetune::fine_tune(&model, &sets, &options).unwrap();
    assert!(tuned.final_loss.is_finite());
    let moved = max_abs_diff(&wte(&model), &wte(&original));
    assert!(moved > 1e-4, "training left the checkpoint's weights unchanged ({moved})");

    let heads = Heads::new(
        model.config().pooled_dim(),
        Heads::new_random(2, model.config().pooled_dim(), 9)
            .unwrap()
            .weight()
            .iter()
            .map(|w| w * 40.0)
            .collect(),
        vec![0.2, -0.3],
    )
    .unwrap();
    let onnx = dir.path().join("model.onnx");
    let meta = ExportMeta { model_version: "hf".into(), signals: vec!["a".into(), "b".into()] };
    export_onnx(&model, Some(&heads), &onnx, &meta).unwrap();
    compare_padded_batch(&model, &heads, &onnx, &[5, 40, 1, 17]);
}

/// Runs `onnx` on a right-padded batch of rows of `lengths` and checks `last_hidden_state`
/// (every position) and `scores` against candle within 1e-4.
fn compare_padded_batch(model: &Gpt2, heads: &Heads, onnx: &Path, lengths: &[usize]) {
    let (batch, seq) = (lengths.len(), *lengths.iter().max().unwrap());
    let vocab = model.config().vocab_size;
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for (r, &len) in lengths.iter().enumerate() {
        for t in 0..seq {
            ids.push(((r * 97 + t * 31 + 5) % vocab) as i64);
            mask.push(i64::from(t < len));
        }
    }
    let library = runtime::locate_library(None).expect("ONNX Runtime (run scripts/setup.sh)");
    let env = runtime::environment(&library).unwrap();
    let mut session = runtime::cpu_session(env, onnx, 1).unwrap();
    let shape = vec![batch as i64, seq as i64];
    let outputs = session
        .run(ort::inputs![
            "input_ids" => OrtTensor::from_array((shape.clone(), ids.clone())).unwrap(),
            "attention_mask" => OrtTensor::from_array((shape, mask.clone())).unwrap(),
        ])
        .unwrap();
    let ort_hidden: Vec<f32> =
        outputs["last_hidden_state"].try_extract_array::<f32>().unwrap().iter().copied().collect();
    let ort_scores: Vec<f32> =
        outputs["scores"].try_extract_array::<f32>().unwrap().iter().copied().collect();

    let ids_t = Tensor::from_vec(ids, (batch, seq), &Device::Cpu).unwrap();
    let mask_t = Tensor::from_vec(mask, (batch, seq), &Device::Cpu).unwrap();
    let hidden = model.forward_hidden(&ids_t, &mask_t).unwrap().detach();
    let scores = heads.apply(&pool(&hidden, &mask_t).unwrap()).unwrap();
    let hidden: Vec<f32> = hidden.flatten_all().unwrap().to_vec1().unwrap();
    let scores: Vec<f32> = scores.flatten_all().unwrap().to_vec1().unwrap();
    let (hidden_diff, scores_diff) =
        (max_abs_diff(&hidden, &ort_hidden), max_abs_diff(&scores, &ort_scores));
    println!("onnx vs candle: hidden {hidden_diff:e}, scores {scores_diff:e}");
    assert!(hidden_diff <= 1e-4, "last_hidden_state differs by {hidden_diff}");
    assert!(scores_diff <= 1e-4, "scores differ by {scores_diff}");
    let spread = ort_scores.iter().fold(0.0f32, |m, s| m.max((s - 0.5).abs()));
    assert!(spread > 0.05, "scores all near 0.5 ({spread}): the comparison would be weak");
}

#[test]
fn missing_files_and_vocabulary_mismatch_name_the_file() {
    let tokenizer = tiny_tokenizer(300);
    let model = Gpt2::new_random(tiny_config(tokenizer.vocab_size()), &Device::Cpu, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_hf_checkpoint(dir.path(), &model, &tokenizer);

    let wrong = tiny_config(tokenizer.vocab_size() + 7);
    std::fs::write(dir.path().join(CONFIG_FILE), hf_config_json(&wrong)).unwrap();
    let Err(err) = load(dir.path(), &Device::Cpu) else { panic!("a mismatch must fail") };
    let message = err.to_string();
    assert!(matches!(err, PretrainedError::VocabMismatch { .. }), "{message}");
    assert!(message.contains("tokenizer.json") && message.contains("config.json"), "{message}");

    std::fs::remove_file(dir.path().join(TOKENIZER_FILE)).unwrap();
    let Err(err) = load(dir.path(), &Device::Cpu) else { panic!("no tokenizer must fail") };
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    std::fs::remove_file(dir.path().join(WEIGHTS_FILE)).unwrap();
    let Err(err) = load(dir.path(), &Device::Cpu) else { panic!("no weights must fail") };
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}
