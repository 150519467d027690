//! Tests of configuration loading.

use super::*;

const MINIMAL: &str = r#"
    [kafka]
    brokers = "127.0.0.1:9092"
    [[inputs]]
    topic = "clicks"
    format = "json"
    [output]
    signals_topic = "signals"
    dlq_topic = "dlq"
"#;

fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).unwrap();
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    Config::load(Some(&path), env)
}

#[test]
fn minimal_file_gets_defaults() {
    let config = load(MINIMAL, &[]).unwrap();
    assert_eq!(config.scoring.batch_size, 32);
    assert_eq!(config.output.format, Format::Protobuf);
    assert_eq!(config.window.user_ttl, None);
}

#[test]
fn unknown_key_is_named() {
    let err = load(&format!("{MINIMAL}\n[window]\nmax_evnets = 3\n"), &[]).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("window") && message.contains("max_evnets"), "{message}");
}

#[test]
fn bad_value_is_named() {
    let err = load(&format!("{MINIMAL}\n[scoring]\ncoalesce = \"soon\"\n"), &[]).unwrap_err();
    assert!(err.to_string().contains("scoring.coalesce"), "{err}");
    let err = load(&format!("{MINIMAL}\n[scoring]\nbatch_size = 0\n"), &[]).unwrap_err();
    assert!(err.to_string().contains("scoring.batch_size"), "{err}");
    let err = load(&format!("{MINIMAL}\n[scoring]\nmax_waiting = 0\n"), &[]).unwrap_err();
    assert!(err.to_string().contains("scoring.max_waiting"), "{err}");
}

#[test]
fn env_overrides_and_names_its_variable() {
    let env = [
        ("MINDSTREAM__SCORING__BATCH_SIZE", "8"),
        ("MINDSTREAM__KAFKA__CLIENT__SECURITY_PROTOCOL", "SSL"),
        ("MINDSTREAM__WINDOW__SPAN", "2h"),
    ];
    let config = load(MINIMAL, &env).unwrap();
    assert_eq!(config.scoring.batch_size, 8);
    assert_eq!(config.kafka.client["security.protocol"], "SSL");
    assert_eq!(config.window.span, Some(Duration::from_secs(7200)));

    let err = load(MINIMAL, &[("MINDSTREAM__SCORING__BATCH_SIZE", "many")]).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("scoring.batch_size"), "{message}");
    assert!(message.contains("MINDSTREAM__SCORING__BATCH_SIZE"), "{message}");
}

#[test]
fn redaction_hides_secrets() {
    let env = [("MINDSTREAM__KAFKA__CLIENT__SASL_PASSWORD", "hunter2")];
    let config = load(MINIMAL, &env).unwrap();
    let printed = config.redacted();
    assert!(!printed.contains("hunter2"));
    assert!(printed.contains("sasl.password"));
}

#[test]
fn redaction_hides_tls_and_sasl_secrets_but_not_locations() {
    let text = format!(
        "{MINIMAL}\n[kafka.client]\n\
         \"security.protocol\" = \"sasl_ssl\"\n\
         \"ssl.ca.location\" = \"/etc/kafka/ca.pem\"\n\
         \"ssl.key.password\" = \"secret-1\"\n\
         \"ssl.key.pem\" = \"secret-2\"\n\
         \"ssl.keystore.password\" = \"secret-3\"\n\
         \"sasl.password\" = \"secret-4\"\n\
         \"sasl.oauthbearer.client.secret\" = \"secret-5\"\n\
         [kafka.producer]\n\"ssl.key.pem\" = \"secret-6\"\n\
         [kafka.consumer]\n\"sasl.password\" = \"secret-7\"\n"
    );
    let config = load(&text, &[("MINDSTREAM__KAFKA__CLIENT__SSL_KEY_PASSWORD", "secret-8")]);
    let printed = config.unwrap().redacted();
    assert!(!printed.contains("secret-"), "{printed}");
    assert_eq!(printed.matches("<redacted>").count(), 7, "{printed}");
    assert!(printed.contains("/etc/kafka/ca.pem") && printed.contains("sasl_ssl"), "{printed}");
}

#[test]
fn drain_timeout_must_undercut_the_session_timeout() {
    let env = [("MINDSTREAM__KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "6000")];
    let err = load(MINIMAL, &env).unwrap_err();
    assert!(err.to_string().contains("shutdown.drain_timeout"), "{err}");
    let env = [env[0], ("MINDSTREAM__SHUTDOWN__DRAIN_TIMEOUT", "5s")];
    assert!(load(MINIMAL, &env).is_ok());
}

#[test]
fn input_topic_cannot_be_an_output() {
    let text = MINIMAL.replace("topic = \"clicks\"", "topic = \"dlq\"");
    assert!(load(&text, &[]).unwrap_err().to_string().contains("inputs.topic"));
}

#[test]
fn exactly_once_needs_a_transactional_id() {
    let env = [("MINDSTREAM__DELIVERY__MODE", "exactly_once")];
    let err = load(MINIMAL, &env).unwrap_err().to_string();
    assert!(err.contains("delivery.transactional_id"), "{err}");
    let env = [env[0], ("MINDSTREAM__DELIVERY__TRANSACTIONAL_ID", "mindstream-0")];
    assert!(load(MINIMAL, &env).is_ok());
    let env = [env[0], env[1], ("MINDSTREAM__KAFKA__PRODUCER__TRANSACTIONAL_ID", "other")];
    let err = load(MINIMAL, &env).unwrap_err().to_string();
    assert!(err.contains("delivery.mode") && err.contains("transactional.id"), "{err}");
}

#[test]
fn changelog_topic_must_be_its_own() {
    let env = [("MINDSTREAM__STATE__CHANGELOG_TOPIC", "clicks")];
    let err = load(MINIMAL, &env).unwrap_err().to_string();
    assert!(err.contains("state.changelog_topic"), "{err}");
}

/// `model.io_binding` is off unless asked for, in the file or from the environment, and a
/// misspelt model key is still refused.
#[test]
fn io_binding_is_opt_in() {
    assert!(!load(MINIMAL, &[]).unwrap().model.io_binding);
    let file = format!("{MINIMAL}\n[model]\nio_binding = true\n");
    assert!(load(&file, &[]).unwrap().model.io_binding);
    let env = [("MINDSTREAM__MODEL__IO_BINDING", "true")];
    assert!(load(MINIMAL, &env).unwrap().model.io_binding);
    let err = load(&format!("{MINIMAL}\n[model]\nio_bindings = true\n"), &[]).unwrap_err();
    assert!(err.to_string().contains("io_bindings"), "{err}");
}

#[test]
fn segments_are_read_and_a_bad_rule_is_named() {
    let good = format!(
        "{MINIMAL}\n[[segments]]\nname = \"ready\"\nrule = \"purchase_intent > 0.7\"\n\
         [[segments]]\nname = \"carts-42\"\n\
         rule = \"cart_abandonment > 0.8 and interest('42') > 0\"\n"
    );
    let config = load(&good, &[]).unwrap();
    assert_eq!(config.segments.len(), 2);
    assert_eq!(config.segments[1].name, "carts-42");

    let bad = good.replace("purchase_intent > 0.7", "purchase_intent >> 0.7");
    let message = load(&bad, &[]).unwrap_err().to_string();
    assert!(message.contains("segments[0].rule") && message.contains("`ready`"), "{message}");
    assert!(message.contains("at character 17"), "{message}");

    let twice = good.replace("carts-42", "ready");
    let message = load(&twice, &[]).unwrap_err().to_string();
    assert!(message.contains("segments[1].name") && message.contains("twice"), "{message}");

    let spaced = good.replace("carts-42", "carts 42");
    let message = load(&spaced, &[]).unwrap_err().to_string();
    assert!(message.contains("segments[1].name"), "{message}");
}

#[test]
fn segments_and_alerts_come_from_the_environment_too() {
    let env = [
        ("MINDSTREAM__SEGMENTS", "[{ name = \"ready\", rule = \"purchase_intent > 0.7\" }]"),
        ("MINDSTREAM__ALERTS__THRESHOLD", "0.8"),
    ];
    let config = load(MINIMAL, &env).unwrap();
    assert_eq!(config.segments[0].name, "ready");
    assert_eq!(config.alerts.threshold, 0.8);

    let message = load(MINIMAL, &[("MINDSTREAM__ALERTS__THRESHOLD", "1.5")]).unwrap_err();
    assert!(message.to_string().contains("alerts.threshold"), "{message}");
}

#[test]
fn the_alerts_topic_must_differ_from_the_others() {
    let clash = format!("{MINIMAL}\n[alerts]\nenabled = true\n")
        .replace("dlq_topic = \"dlq\"", "dlq_topic = \"dlq\"\nalerts_topic = \"signals\"");
    let message = load(&clash, &[]).unwrap_err().to_string();
    assert!(message.contains("output.alerts_topic"), "{message}");
    let off = clash.replace("enabled = true", "enabled = false");
    assert!(load(&off, &[]).is_ok(), "an unused topic name is not checked");
}
