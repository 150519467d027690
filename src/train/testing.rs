//! Fixtures shared by the training tests: a tiny tokenizer and tiny data sets built from it,
//! written by the tests themselves.

use crate::render::Segment;
use crate::tokenize::TextTokenizer;
use crate::train::build::DataSet;
use crate::train::catalog::OUTPUTS;
use crate::train::dataset::{Example, Split};

/// Lines in the style of rendered windows, for training a tiny tokenizer.
fn corpus() -> Vec<String> {
    (0..300)
        .map(|i| {
            format!(
                "+{}m view c{} i{} ${}\n+{}m cart c{} i{}\nreview {} stars: {}\n",
                i % 13,
                i % 7,
                i % 11,
                10 + i % 17,
                i % 5,
                i % 9,
                i % 3,
                i % 5,
                ["good fit", "too small", "lovely colour", "returned it"][i % 4]
            )
        })
        .collect()
}

/// A byte-level BPE tokenizer of at most `vocab_size` entries trained on [`corpus`].
pub(crate) fn tiny_tokenizer(vocab_size: usize) -> TextTokenizer {
    let lines = corpus();
    let trained = crate::train::bpe::train(lines.iter(), vocab_size).expect("train tokenizer");
    TextTokenizer::from_tokenizer(trained)
}

/// One data set of `rows` training examples (every fourth one validation), tokenized by
/// `tokenizer`, with labels that depend on the text so the heads have something to learn.
pub(crate) fn tiny_sets(tokenizer: &TextTokenizer, rows: usize) -> Vec<DataSet> {
    let lines = corpus();
    let mut examples = Vec::new();
    let mut tokens = Vec::new();
    for i in 0..rows {
        let text = &lines[i % lines.len()];
        let mut labels = vec![None; OUTPUTS];
        labels[0] = Some(text.contains("cart c1"));
        labels[OUTPUTS - 1] = Some(i % 2 == 0);
        let split = if i % 4 == 3 { Split::Validation } else { Split::Train };
        examples.push(Example {
            time_ms: i as i64,
            split,
            segments: vec![Segment { text: text.clone(), event: None }],
            counts: Vec::new(),
            labels,
        });
        tokens.push(tokenizer.encode(text).expect("encode"));
    }
    vec![DataSet { name: "tiny", source: "test".into(), terms: "test", rows, examples, tokens }]
}
