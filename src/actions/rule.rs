//! Segment rules: a small boolean language over a signal record's scores and interests.
//!
//! ```text
//! rule    = or
//! or      = and { "or" and }
//! and     = unary { "and" unary }
//! unary   = "not" unary | "(" or ")" | compare
//! compare = operand ( ">" | ">=" | "<" | "<=" ) number
//! operand = signal-name | "interest" "(" quoted-category ")"
//! ```
//!
//! `purchase_intent > 0.7 and price_sensitivity > 0.6` or
//! `cart_abandonment > 0.8 and interest("1464116") > 0`. A signal the record does not carry
//! (its head does not apply to the window) fails every comparison; `interest("c")` is the
//! category's share of the record's interests, 0 when it is not among them.

use crate::signals::SignalRecord;

/// A parsed rule.
#[derive(Clone, Debug, PartialEq)]
pub enum Rule {
    Any(Vec<Rule>),
    All(Vec<Rule>),
    Not(Box<Rule>),
    Compare { operand: Operand, op: Op, value: f32 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operand {
    Signal(String),
    Interest(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Above,
    AtLeast,
    Below,
    AtMost,
}

/// Why a rule does not parse, with the character position it was found at.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("at character {position}: {message}")]
pub struct RuleError {
    pub position: usize,
    pub message: String,
}

impl Rule {
    pub fn parse(text: &str) -> Result<Rule, RuleError> {
        let tokens = lex(text)?;
        let mut parser = Parser { tokens, at: 0, end: text.chars().count() };
        let rule = parser.or()?;
        match parser.peek() {
            None => Ok(rule),
            Some((position, token)) => Err(RuleError {
                position: *position,
                message: format!("unexpected {}", token.describe()),
            }),
        }
    }

    /// Whether `record` satisfies the rule.
    pub fn holds(&self, record: &SignalRecord) -> bool {
        match self {
            Rule::Any(rules) => rules.iter().any(|r| r.holds(record)),
            Rule::All(rules) => rules.iter().all(|r| r.holds(record)),
            Rule::Not(rule) => !rule.holds(record),
            Rule::Compare { operand, op, value } => match operand.value(record) {
                None => false,
                Some(actual) => op.compare(actual, *value),
            },
        }
    }

    /// The operands the rule reads, each once, in the order written.
    pub fn operands(&self) -> Vec<&Operand> {
        let mut out = Vec::new();
        self.collect(&mut out);
        out
    }

    fn collect<'a>(&'a self, out: &mut Vec<&'a Operand>) {
        match self {
            Rule::Any(rules) | Rule::All(rules) => rules.iter().for_each(|r| r.collect(out)),
            Rule::Not(rule) => rule.collect(out),
            Rule::Compare { operand, .. } => {
                if !out.contains(&operand) {
                    out.push(operand);
                }
            }
        }
    }
}

impl Operand {
    /// The operand's value in `record`; `None` for a signal the record does not carry.
    pub fn value(&self, record: &SignalRecord) -> Option<f32> {
        match self {
            Operand::Signal(name) => record.score(name).map(|s| s.value),
            Operand::Interest(category) => Some(
                record
                    .interests
                    .iter()
                    .find(|i| &i.category_id == category)
                    .map_or(0.0, |i| i.weight),
            ),
        }
    }
}

impl Op {
    fn compare(self, actual: f32, bound: f32) -> bool {
        match self {
            Op::Above => actual > bound,
            Op::AtLeast => actual >= bound,
            Op::Below => actual < bound,
            Op::AtMost => actual <= bound,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Word(String),
    Number(f32),
    Quoted(String),
    Op(Op),
    Open,
    Close,
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Word(word) => format!("`{word}`"),
            Token::Number(number) => format!("number {number}"),
            Token::Quoted(text) => format!("\"{text}\""),
            Token::Op(_) => "comparison".into(),
            Token::Open => "`(`".into(),
            Token::Close => "`)`".into(),
        }
    }
}

fn lex(text: &str) -> Result<Vec<(usize, Token)>, RuleError> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        let fail = |message: String| RuleError { position: start, message };
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let token = if c == '(' {
            i += 1;
            Token::Open
        } else if c == ')' {
            i += 1;
            Token::Close
        } else if c == '>' || c == '<' {
            let equal = chars.get(i + 1) == Some(&'=');
            i += 1 + usize::from(equal);
            Token::Op(match (c, equal) {
                ('>', false) => Op::Above,
                ('>', true) => Op::AtLeast,
                ('<', false) => Op::Below,
                _ => Op::AtMost,
            })
        } else if c == '"' || c == '\'' {
            let close = chars[i + 1..].iter().position(|&d| d == c);
            let Some(length) = close else {
                return Err(fail("unterminated quoted category".into()));
            };
            let quoted: String = chars[i + 1..i + 1 + length].iter().collect();
            i += length + 2;
            Token::Quoted(quoted)
        } else if c.is_ascii_digit() || c == '.' || c == '-' {
            let length = chars[i..]
                .iter()
                .position(|d| !(d.is_ascii_digit() || *d == '.' || *d == '-' || *d == 'e'))
                .unwrap_or(chars.len() - i);
            let number: String = chars[i..i + length].iter().collect();
            i += length;
            match number.parse::<f32>() {
                Ok(value) if value.is_finite() => Token::Number(value),
                _ => return Err(fail(format!("`{number}` is not a number"))),
            }
        } else if c.is_ascii_alphabetic() || c == '_' {
            let length = chars[i..]
                .iter()
                .position(|d| !(d.is_ascii_alphanumeric() || *d == '_'))
                .unwrap_or(chars.len() - i);
            let word: String = chars[i..i + length].iter().collect();
            i += length;
            Token::Word(word)
        } else {
            return Err(fail(format!("unexpected character `{c}`")));
        };
        tokens.push((start, token));
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<(usize, Token)>,
    at: usize,
    /// Length of the rule in characters, the position reported at its end.
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&(usize, Token)> {
        self.tokens.get(self.at)
    }

    fn next(&mut self, wanted: &str) -> Result<(usize, Token), RuleError> {
        match self.tokens.get(self.at).cloned() {
            Some(token) => {
                self.at += 1;
                Ok(token)
            }
            None => Err(RuleError {
                position: self.end,
                message: format!("the rule ends where {wanted} was expected"),
            }),
        }
    }

    fn keyword(&mut self, word: &str) -> bool {
        let found = matches!(self.peek(), Some((_, Token::Word(w))) if w == word);
        self.at += usize::from(found);
        found
    }

    fn or(&mut self) -> Result<Rule, RuleError> {
        let mut parts = vec![self.and()?];
        while self.keyword("or") {
            parts.push(self.and()?);
        }
        Ok(if parts.len() == 1 { parts.remove(0) } else { Rule::Any(parts) })
    }

    fn and(&mut self) -> Result<Rule, RuleError> {
        let mut parts = vec![self.unary()?];
        while self.keyword("and") {
            parts.push(self.unary()?);
        }
        Ok(if parts.len() == 1 { parts.remove(0) } else { Rule::All(parts) })
    }

    fn unary(&mut self) -> Result<Rule, RuleError> {
        if self.keyword("not") {
            return Ok(Rule::Not(Box::new(self.unary()?)));
        }
        if matches!(self.peek(), Some((_, Token::Open))) {
            self.at += 1;
            let inner = self.or()?;
            return match self.next("`)`")? {
                (_, Token::Close) => Ok(inner),
                (position, token) => Err(RuleError {
                    position,
                    message: format!("expected `)`, found {}", token.describe()),
                }),
            };
        }
        self.compare()
    }

    fn compare(&mut self) -> Result<Rule, RuleError> {
        let operand = self.operand()?;
        let op = match self.next("a comparison")? {
            (_, Token::Op(op)) => op,
            (position, token) => {
                let message = format!("expected >, >=, < or <=, found {}", token.describe());
                return Err(RuleError { position, message });
            }
        };
        let value = match self.next("a number")? {
            (_, Token::Number(value)) => value,
            (position, token) => {
                let message = format!("expected a number, found {}", token.describe());
                return Err(RuleError { position, message });
            }
        };
        Ok(Rule::Compare { operand, op, value })
    }

    fn operand(&mut self) -> Result<Operand, RuleError> {
        let (position, token) = self.next("a signal name or interest(\"category\")")?;
        let fail = |message: String| Err(RuleError { position, message });
        let Token::Word(word) = token else {
            return fail(format!("expected a signal name, found {}", token.describe()));
        };
        if ["and", "or", "not"].contains(&word.as_str()) {
            return fail(format!("expected a signal name, found `{word}`"));
        }
        if word != "interest" {
            return Ok(Operand::Signal(word));
        }
        let open = self.next("`(`")?;
        let quoted = self.next("a quoted category")?;
        let close = self.next("`)`")?;
        match (open.1, quoted.1, close.1) {
            (Token::Open, Token::Quoted(category), Token::Close) if !category.is_empty() => {
                Ok(Operand::Interest(category))
            }
            _ => fail("write interest(\"category id\") with a non-empty quoted id".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(scores: &[(&str, f32)], interests: &[(&str, f32)]) -> SignalRecord {
        SignalRecord::for_test("k", 1, scores, interests)
    }

    #[test]
    fn conjunction_of_two_thresholds() {
        let rule = Rule::parse("purchase_intent > 0.7 and price_sensitivity > 0.6").unwrap();
        assert!(rule.holds(&record(&[("purchase_intent", 0.8), ("price_sensitivity", 0.7)], &[])));
        assert!(!rule.holds(&record(&[("purchase_intent", 0.8), ("price_sensitivity", 0.5)], &[])));
        assert!(!rule.holds(&record(&[("purchase_intent", 0.8)], &[])), "missing score fails");
    }

    #[test]
    fn interest_or_not_and_precedence() {
        let rule =
            Rule::parse("cart_abandonment >= 0.8 and interest('42') > 0 or not churn_risk < 0.9")
                .unwrap();
        let in_42 = record(&[("cart_abandonment", 0.8), ("churn_risk", 0.1)], &[("42", 0.3)]);
        let elsewhere = record(&[("cart_abandonment", 0.9), ("churn_risk", 0.1)], &[("7", 1.0)]);
        let churning = record(&[("churn_risk", 0.95)], &[]);
        assert!(rule.holds(&in_42));
        assert!(!rule.holds(&elsewhere));
        assert!(rule.holds(&churning));
        assert_eq!(
            rule.operands(),
            vec![
                &Operand::Signal("cart_abandonment".into()),
                &Operand::Interest("42".into()),
                &Operand::Signal("churn_risk".into()),
            ]
        );
    }

    #[test]
    fn parentheses_group() {
        let rule = Rule::parse("(a > 0.5 or b > 0.5) and c <= 0.2").unwrap();
        assert!(rule.holds(&record(&[("b", 0.6), ("c", 0.2)], &[])));
        assert!(!rule.holds(&record(&[("b", 0.6), ("c", 0.3)], &[])));
    }

    #[test]
    fn errors_say_where_and_what() {
        let cases = [
            ("purchase_intent >", 17, "ends where a number"),
            ("purchase_intent 0.7", 16, "expected >, >=, < or <="),
            ("purchase_intent > high", 18, "expected a number"),
            ("(a > 1", 6, "ends where `)`"),
            ("a > 1 b > 2", 6, "unexpected `b`"),
            ("a = 1", 2, "unexpected character `=`"),
            ("interest(42) > 0", 0, "quoted id"),
            ("and > 1", 0, "found `and`"),
            ("interest(\"x) > 1", 9, "unterminated"),
            ("", 0, "ends where a signal name"),
        ];
        for (text, position, message) in cases {
            let err = Rule::parse(text).unwrap_err();
            assert_eq!(err.position, position, "{text}: {err}");
            assert!(err.message.contains(message), "{text}: {err}");
        }
    }
}
