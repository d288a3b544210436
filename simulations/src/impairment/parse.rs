//! The netem token grammar: [`parse_args`] turns `delay 50ms loss 1%` into an
//! [`Impairment`], [`write_tokens`] writes one back in the same form.
//!
//! Shared by the command line, the control socket and the schedule file, so all three
//! accept exactly the same words and report the same errors.

use std::fmt;

use super::units::{self, format_duration, ValueError, MAX_DURATION};
use super::{
    Distribution, GilbertElliott, Impairment, LossModel, DEFAULT_LIMIT, MAX_DATAGRAM, MAX_LIMIT,
};

/// Why a list of impairment tokens was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ImpairmentError {
    /// A token is not an impairment keyword (values that follow a keyword they do not
    /// belong to, such as netem's correlation percentages, land here too).
    #[error(
        "unknown impairment keyword `{0}` (expected delay, jitter, distribution, loss, \
         duplicate, reorder, corrupt, rate, burst, mtu, limit, blackout or none)"
    )]
    UnknownKeyword(String),
    /// A keyword came last without its value.
    #[error("`{0}` needs a value")]
    MissingValue(&'static str),
    /// A keyword's value did not parse.
    #[error("`{keyword}`: {reason}")]
    InvalidValue {
        /// The keyword whose value is wrong.
        keyword: &'static str,
        /// What is wrong with it.
        reason: ValueError,
    },
    /// The same keyword was given twice.
    #[error("`{0}` given more than once")]
    Repeated(&'static str),
    /// The values are fine one by one but not together, or out of range.
    #[error("{0}")]
    Inconsistent(&'static str),
}

struct Tokens<'a, S> {
    args: &'a [S],
    next: usize,
}

impl<S: AsRef<str>> Tokens<'_, S> {
    fn peek(&self) -> Option<&str> {
        self.args.get(self.next).map(AsRef::as_ref)
    }

    fn next(&mut self) -> Option<&str> {
        let token = self.args.get(self.next).map(AsRef::as_ref);
        self.next += usize::from(token.is_some());
        token
    }

    fn value(&mut self, keyword: &'static str) -> Result<&str, ImpairmentError> {
        self.next().ok_or(ImpairmentError::MissingValue(keyword))
    }

    fn parsed<T>(
        &mut self,
        keyword: &'static str,
        parse: impl FnOnce(&str) -> Result<T, ValueError>,
    ) -> Result<T, ImpairmentError> {
        let text = self.value(keyword)?;
        parse(text).map_err(|reason| ImpairmentError::InvalidValue { keyword, reason })
    }

    /// Consumes the next token if it parses with `parse` (optional positional values).
    fn optional<T>(&mut self, parse: impl FnOnce(&str) -> Result<T, ValueError>) -> Option<T> {
        let value = parse(self.peek()?).ok()?;
        self.next += 1;
        Some(value)
    }
}

/// Remembers which keywords were seen, to reject repeats.
#[derive(Default)]
struct Seen(Vec<&'static str>);

impl Seen {
    fn first(&mut self, keyword: &'static str) -> Result<(), ImpairmentError> {
        if self.0.contains(&keyword) {
            return Err(ImpairmentError::Repeated(keyword));
        }
        self.0.push(keyword);
        Ok(())
    }
}

/// Parses netem-like tokens; see [`Impairment::parse_args`] for the grammar.
pub(super) fn parse_args<S: AsRef<str>>(args: &[S]) -> Result<Impairment, ImpairmentError> {
    let mut imp = Impairment::default();
    let mut tokens = Tokens { args, next: 0 };
    let mut seen = Seen::default();
    if let [only] = args {
        if only.as_ref().eq_ignore_ascii_case("none") {
            return Ok(imp);
        }
    }
    while let Some(raw) = tokens.next() {
        let keyword = raw.trim_start_matches("--").to_ascii_lowercase();
        match keyword.as_str() {
            "delay" => {
                seen.first("delay")?;
                imp.delay = tokens.parsed("delay", units::parse_duration)?;
                if let Some(jitter) = tokens.optional(units::parse_duration) {
                    seen.first("jitter")?;
                    imp.jitter = jitter;
                }
            }
            "jitter" => {
                seen.first("jitter")?;
                imp.jitter = tokens.parsed("jitter", units::parse_duration)?;
            }
            "distribution" | "dist" => {
                seen.first("distribution")?;
                imp.distribution = tokens.parsed("distribution", str::parse::<Distribution>)?;
            }
            "loss" => {
                seen.first("loss")?;
                let model = match tokens.peek().map(str::to_ascii_lowercase).as_deref() {
                    Some("random") => {
                        tokens.next();
                        LossModel::Random(tokens.parsed("loss", units::parse_percent)?)
                    }
                    Some("gemodel") => {
                        tokens.next();
                        let mut values = vec![tokens.parsed("loss", units::parse_percent)?];
                        while values.len() < 4 {
                            match tokens.optional(units::parse_percent) {
                                Some(value) => values.push(value),
                                None => break,
                            }
                        }
                        // One to four values by construction.
                        LossModel::GilbertElliott(GilbertElliott::from_percents(&values).ok_or(
                            ImpairmentError::Inconsistent("gemodel takes one to four values"),
                        )?)
                    }
                    _ => LossModel::Random(tokens.parsed("loss", units::parse_percent)?),
                };
                imp.loss = Some(model);
            }
            "loss-gemodel" => {
                seen.first("loss")?;
                let model = tokens.parsed("loss-gemodel", str::parse::<GilbertElliott>)?;
                imp.loss = Some(LossModel::GilbertElliott(model));
            }
            "duplicate" => {
                seen.first("duplicate")?;
                imp.duplicate = tokens.parsed("duplicate", units::parse_percent)?;
            }
            "reorder" => {
                seen.first("reorder")?;
                imp.reorder = tokens.parsed("reorder", units::parse_percent)?;
            }
            "corrupt" => {
                seen.first("corrupt")?;
                imp.corrupt = tokens.parsed("corrupt", units::parse_percent)?;
            }
            "rate" => {
                seen.first("rate")?;
                imp.rate = Some(tokens.parsed("rate", units::parse_rate)?);
            }
            "burst" => {
                seen.first("burst")?;
                imp.burst = tokens.parsed("burst", units::parse_burst)?;
            }
            "mtu" => {
                seen.first("mtu")?;
                imp.mtu = Some(tokens.parsed("mtu", units::parse_mtu)?);
            }
            "limit" => {
                seen.first("limit")?;
                imp.limit = tokens.parsed("limit", units::parse_limit)?;
            }
            "blackout" => {
                seen.first("blackout")?;
                imp.blackout = true;
            }
            _ => return Err(ImpairmentError::UnknownKeyword(raw.to_owned())),
        }
    }
    validate(&imp)?;
    Ok(imp)
}

/// The cross-field and range rules; see [`Impairment::validate`].
pub(super) fn validate(imp: &Impairment) -> Result<(), ImpairmentError> {
    if imp.delay > MAX_DURATION || imp.jitter > MAX_DURATION {
        return Err(ImpairmentError::Inconsistent(
            "delay and jitter are at most 1 hour",
        ));
    }
    if !imp.reorder.is_zero() && imp.delay.is_zero() {
        return Err(ImpairmentError::Inconsistent(
            "reorder needs a delay: a reordered datagram skips the delay to overtake the others",
        ));
    }
    if imp.burst > 0 && imp.rate.is_none() {
        return Err(ImpairmentError::Inconsistent("burst needs a rate"));
    }
    if let Some(mtu) = imp.mtu {
        if mtu == 0 || mtu as usize > MAX_DATAGRAM {
            return Err(ImpairmentError::Inconsistent(
                "mtu is between 1 and 65535 bytes",
            ));
        }
    }
    if imp.limit == 0 || imp.limit > MAX_LIMIT {
        return Err(ImpairmentError::Inconsistent(
            "limit is between 1 and 1000000 datagrams",
        ));
    }
    Ok(())
}

/// Writes `imp` as tokens [`parse_args`] reads back to the same value; `none` if empty.
pub(super) fn write_tokens(imp: &Impairment, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let mut words: Vec<String> = Vec::new();
    if !imp.delay.is_zero() {
        words.push(format!("delay {}", format_duration(imp.delay)));
    }
    if !imp.jitter.is_zero() {
        words.push(format!("jitter {}", format_duration(imp.jitter)));
    }
    if imp.distribution != Distribution::default() {
        words.push(format!("distribution {}", imp.distribution));
    }
    match &imp.loss {
        None => {}
        Some(LossModel::Random(p)) => words.push(format!("loss {p}")),
        Some(LossModel::GilbertElliott(ge)) => words.push(format!("loss gemodel {ge}")),
    }
    for (keyword, value) in [
        ("duplicate", imp.duplicate),
        ("reorder", imp.reorder),
        ("corrupt", imp.corrupt),
    ] {
        if !value.is_zero() {
            words.push(format!("{keyword} {value}"));
        }
    }
    if let Some(rate) = imp.rate {
        words.push(format!("rate {rate}"));
    }
    if imp.burst > 0 {
        words.push(format!("burst {}", imp.burst));
    }
    if let Some(mtu) = imp.mtu {
        words.push(format!("mtu {mtu}"));
    }
    if imp.limit != DEFAULT_LIMIT {
        words.push(format!("limit {}", imp.limit));
    }
    if imp.blackout {
        words.push("blackout".to_owned());
    }
    if words.is_empty() {
        f.write_str("none")
    } else {
        f.write_str(&words.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::impairment::{Percent, Rate};
    use std::time::Duration;

    fn parse(text: &str) -> Result<Impairment, ImpairmentError> {
        text.parse()
    }

    fn pct(p: f64) -> Percent {
        Percent::new(p).expect("valid percentage")
    }

    #[test]
    fn empty_and_none_are_no_impairment() {
        assert_eq!(parse(""), Ok(Impairment::default()));
        assert_eq!(parse("none"), Ok(Impairment::default()));
        assert!(Impairment::default().is_none());
        assert_eq!(Impairment::default().to_string(), "none");
    }

    #[test]
    fn every_keyword_parses() {
        let imp = parse(
            "delay 50ms 10ms distribution normal loss 1% duplicate 2% reorder 5% \
             corrupt 0.1% rate 1mbit burst 3000 mtu 1200 limit 50 blackout",
        )
        .expect("valid");
        assert_eq!(imp.delay, Duration::from_millis(50));
        assert_eq!(imp.jitter, Duration::from_millis(10));
        assert_eq!(imp.distribution, Distribution::Normal);
        assert_eq!(imp.loss, Some(LossModel::Random(pct(1.0))));
        assert_eq!(imp.duplicate, pct(2.0));
        assert_eq!(imp.reorder, pct(5.0));
        assert_eq!(imp.corrupt, pct(0.1));
        assert_eq!(imp.rate, Rate::bits_per_second(1_000_000));
        assert_eq!(imp.burst, 3000);
        assert_eq!(imp.mtu, Some(1200));
        assert_eq!(imp.limit, 50);
        assert!(imp.blackout);
    }

    #[test]
    fn flag_form_is_accepted() {
        let flags = Impairment::parse_args(&[
            "--delay",
            "50ms",
            "--jitter",
            "10ms",
            "--distribution",
            "normal",
            "--loss-gemodel",
            "1%,10%",
        ])
        .expect("valid");
        let tokens = parse("delay 50ms 10ms distribution normal loss gemodel 1% 10%");
        assert_eq!(Ok(flags), tokens);
    }

    #[test]
    fn gemodel_defaults_follow_netem() {
        let imp = parse("loss gemodel 1%").expect("valid");
        let Some(LossModel::GilbertElliott(ge)) = imp.loss else {
            panic!("expected gemodel, got {:?}", imp.loss);
        };
        assert_eq!(ge.p, pct(1.0));
        assert_eq!(ge.r, Percent::HUNDRED);
        assert_eq!(ge.bad_loss, Percent::HUNDRED);
        assert_eq!(ge.good_loss, Percent::ZERO);

        let imp = parse("loss gemodel 1% 10% 70% 0.1% duplicate 1%").expect("valid");
        let Some(LossModel::GilbertElliott(ge)) = imp.loss else {
            panic!("expected gemodel, got {:?}", imp.loss);
        };
        assert_eq!(
            (ge.r, ge.bad_loss, ge.good_loss),
            (pct(10.0), pct(70.0), pct(0.1))
        );
        assert_eq!(imp.duplicate, pct(1.0));
        assert!("1%,2%,3%,4%,5%".parse::<GilbertElliott>().is_err());
    }

    #[test]
    fn loss_random_keyword_is_optional() {
        assert_eq!(parse("loss random 3%"), parse("loss 3%"));
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "none",
            "delay 50ms",
            "delay 50ms jitter 10ms distribution pareto",
            "loss 0.5% duplicate 1% corrupt 0.1%",
            "loss gemodel 1% 10% 70% 0.1%",
            "delay 20ms reorder 25%",
            "rate 1mbit burst 1500 mtu 1200 limit 10",
            "blackout",
            "jitter 5ms",
        ] {
            let imp = parse(text).expect(text);
            assert_eq!(imp.to_string(), text);
            assert_eq!(parse(&imp.to_string()), Ok(imp));
        }
    }

    #[test]
    fn serde_uses_the_netem_text() {
        let imp = parse("delay 50ms loss 1%").expect("valid");
        let json = serde_json::to_string(&imp).expect("serializes");
        assert_eq!(json, "\"delay 50ms loss 1%\"");
        let back: Impairment = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, imp);
        assert!(serde_json::from_str::<Impairment>("\"loss 200%\"").is_err());
    }

    #[test]
    fn token_soup_never_panics_and_valid_results_round_trip() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        const WORDS: &[&str] = &[
            "delay",
            "jitter",
            "distribution",
            "dist",
            "loss",
            "random",
            "gemodel",
            "loss-gemodel",
            "duplicate",
            "reorder",
            "corrupt",
            "rate",
            "burst",
            "mtu",
            "limit",
            "blackout",
            "none",
            "--delay",
            "50ms",
            "0",
            "1.5s",
            "-1ms",
            "1%",
            "100%",
            "0.001%",
            "101%",
            "%",
            "normal",
            "pareto",
            "1mbit",
            "10mbps",
            "0bit",
            "1200",
            "65536",
            "10kb",
            "1%,2%",
            "1%,,2%",
            "",
            " ",
            "\u{0}",
            "ms",
            "9999999999999999999999s",
            "1e9%",
        ];
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..20_000 {
            let n = rng.random_range(0..8);
            let tokens: Vec<&str> = (0..n)
                .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                .collect();
            if let Ok(imp) = Impairment::parse_args(&tokens) {
                assert_eq!(parse(&imp.to_string()), Ok(imp.clone()), "{tokens:?}");
            }
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let cases: &[(&str, &str)] = &[
            ("delay", "`delay` needs a value"),
            ("delay fast", "`delay`: invalid duration `fast`"),
            ("loss 150%", "`loss`: percentage `150%` is out of range"),
            ("loss 1% 25%", "unknown impairment keyword `25%`"),
            ("wobble 3", "unknown impairment keyword `wobble`"),
            ("delay 5ms delay 6ms", "`delay` given more than once"),
            ("delay 5ms 1ms jitter 2ms", "`jitter` given more than once"),
            ("loss 1% loss-gemodel 1%", "`loss` given more than once"),
            ("reorder 5%", "reorder needs a delay"),
            ("burst 10kb", "burst needs a rate"),
            ("mtu 0", "`mtu`: mtu `0` is out of range: 1 to 65535 bytes"),
            ("mtu 70000", "`mtu`: mtu `70000` is out of range"),
            (
                "limit 0",
                "`limit`: limit `0` is out of range: 1 to 1000000",
            ),
            ("rate 0bit", "`rate`: rate `0bit` is out of range"),
            ("distribution gamma", "invalid distribution `gamma`"),
            ("none delay 5ms", "unknown impairment keyword `none`"),
        ];
        for (text, expected) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(
                err.contains(expected),
                "{text:?}: {err:?} lacks {expected:?}"
            );
        }
    }
}
