//! Start-up errors: a bad configuration stops the binaries with the key named.

use std::time::Duration;

use crate::support;

fn check_config(text: &str, env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let mut command = support::mindstream();
    command.args(["--config", path.to_str().unwrap(), "check-config"]);
    for (k, v) in env {
        command.env(k, v);
    }
    let output = support::run_with_limit(command, Duration::from_secs(30));
    (output.status.code() == Some(2), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn unknown_key_stops_start_up_naming_it() {
    let (usage_error, stderr) = check_config("[window]\nmax_evnets = 3\n", &[]);
    assert!(usage_error, "{stderr}");
    assert!(stderr.contains("max_evnets"), "{stderr}");
}

#[test]
fn bad_value_from_the_environment_names_key_and_variable() {
    let (usage_error, stderr) = check_config("", &[("MINDSTREAM__SCORING__COALESCE", "\"soon\"")]);
    assert!(usage_error, "{stderr}");
    assert!(stderr.contains("scoring.coalesce"), "{stderr}");
    assert!(stderr.contains("MINDSTREAM__SCORING__COALESCE"), "{stderr}");
}

#[test]
fn run_without_inputs_or_model_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[model]\ndir = \"/nonexistent/model\"\n").unwrap();
    let mut command = support::mindstream();
    command.args(["--config", path.to_str().unwrap(), "run"]);
    let output = support::run_with_limit(command, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("inputs"), "{stderr}");

    std::fs::write(
        &path,
        "[[inputs]]\ntopic = \"t\"\nformat = \"json\"\n[model]\ndir = \"/nonexistent/model\"\n",
    )
    .unwrap();
    let mut command = support::mindstream();
    command.args(["--config", path.to_str().unwrap(), "run"]);
    let output = support::run_with_limit(command, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/nonexistent/model"), "{stderr}");
}
