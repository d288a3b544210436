//! Cutting an oversized record body down until it fits
//! [`MAX_RECORD_BYTES`](crate::MAX_RECORD_BYTES), so it is kept, marked,
//! instead of lost.
//!
//! Who drives it: the spoke buffer's append, when a body's encoding is over
//! the limit. What it must not do: cut what identifies the record, or cut
//! silently. Kept whole: the kind, class and timestamp (the caller's),
//! enums, numbers, flags, digests, trace and span ids and SPIFFE IDs (at
//! most 2 KiB each by construction). Cut, in steps until the record fits:
//! free-text strings (reasons, messages, names, versions, addresses) and
//! lists (endpoint candidates, transition actions). A cut string ends with
//! [`TRUNCATED_MARK`]; a cut list ends with one entry saying how many
//! entries were dropped (an endpoint candidate whose address is
//! `"…[truncated] N more"` with weight 0, or an action of that text). The
//! names that identify a request (service, operation, policy) are cut to
//! 1 KiB at most, whatever the step.

use crate::chain::EncodedBody;
use crate::record::{EndpointCandidate, RecordBody, RecordError};

/// The suffix of every string [`RecordBody::truncate_to_fit`] cut, and the
/// start of the entry ending every list it cut.
pub const TRUNCATED_MARK: &str = "…[truncated]";

/// Longest an identifying name (service, operation, policy) is kept.
const NAME_MAX: usize = 1024;

/// (free-text bytes, list entries) kept at each step.
const STEPS: [(usize, usize); 4] = [(1024, 64), (256, 16), (64, 4), (16, 1)];

fn cut(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(TRUNCATED_MARK);
    true
}

fn cut_opt(s: &mut Option<String>, max: usize) -> bool {
    s.as_mut().is_some_and(|s| cut(s, max))
}

fn more(n: usize) -> String {
    format!("{TRUNCATED_MARK} {n} more")
}

fn cut_list<T>(v: &mut Vec<T>, keep: usize, marker: impl FnOnce(usize) -> T) -> bool {
    if v.len() <= keep {
        return false;
    }
    let dropped = v.len() - keep;
    v.truncate(keep);
    v.push(marker(dropped));
    true
}

impl RecordBody {
    /// Cuts free text and lists, in steps, until the body fits in a sealed
    /// record; returns whether anything was cut (`false`: it already fit).
    /// Shed bodies are refused ([`RecordError::ReservedKind`]);
    /// [`RecordError::TooLarge`] if even the last step does not fit (not
    /// reachable with the current kinds: what is kept whole is bounded).
    pub fn truncate_to_fit(&mut self) -> Result<bool, RecordError> {
        match EncodedBody::new(self) {
            Ok(_) => return Ok(false),
            Err(RecordError::TooLarge { .. }) => {}
            Err(e) => return Err(e),
        }
        let mut last = None;
        for (text, list) in STEPS {
            self.cut_step(text, list);
            match EncodedBody::new(self) {
                Ok(_) => return Ok(true),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(RecordError::TooLarge {
            len: usize::MAX,
            max: crate::MAX_RECORD_BYTES,
        }))
    }

    fn cut_step(&mut self, text: usize, list: usize) {
        let name = NAME_MAX;
        match self {
            RecordBody::Request(r) => {
                cut(&mut r.service_name, name);
                if let Some(i) = &mut r.identity {
                    cut_opt(&mut i.cipher_suite, text);
                }
                if let Some(p) = &mut r.policy_evaluation {
                    cut(&mut p.policy_name, name);
                    cut(&mut p.policy_version, text);
                    cut_opt(&mut p.matched_rule, text);
                    cut(&mut p.reason, text);
                }
                if let Some(rt) = &mut r.routing_decision {
                    cut_list(&mut rt.available_endpoints, list, |n| EndpointCandidate {
                        address: more(n),
                        weight: 0,
                        healthy: false,
                        locality: None,
                    });
                    for c in &mut rt.available_endpoints {
                        cut(&mut c.address, text.max(TRUNCATED_MARK.len() + 24));
                    }
                    cut_opt(&mut rt.selected_endpoint, text);
                    cut(&mut rt.selection_reason, text);
                    cut_opt(&mut rt.version, text);
                }
                cut(&mut r.telemetry.operation_name, name);
                cut(&mut r.telemetry.status.message, text);
                if let Some(d) = &mut r.drill {
                    cut(&mut d.run, text);
                }
            }
            RecordBody::ModeTransition(m) => {
                cut_opt(&mut m.evidence.service, name);
                cut_list(&mut m.actions, list, more);
                for a in &mut m.actions {
                    cut(a, text.max(TRUNCATED_MARK.len() + 24));
                }
            }
            RecordBody::Certificate(c) => {
                cut(&mut c.serial_number, text);
                cut(&mut c.issuer, text);
            }
            RecordBody::ConfigApplied(c) => {
                cut(&mut c.version, text);
                cut_opt(&mut c.previous_version, text);
            }
            RecordBody::Shed(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{EndpointCandidate, RecordBody};
    use crate::samples;
    use crate::types::UnixMillis;
    use crate::MAX_RECORD_BYTES;

    #[test]
    fn an_oversized_request_is_cut_and_marked_and_keeps_its_identity() {
        let t = UnixMillis(1_705_314_600_000);
        let mut body = samples::request(7, t);
        let RecordBody::Request(orig) = &body else {
            panic!("a request");
        };
        let orig = orig.clone();
        if let RecordBody::Request(r) = &mut body {
            r.service_name = "s".repeat(MAX_RECORD_BYTES);
            r.telemetry.status.message = "é".repeat(40_000);
            if let Some(rt) = &mut r.routing_decision {
                rt.available_endpoints = (0..5_000)
                    .map(|i| EndpointCandidate {
                        address: format!("10.0.{}.{}:8080", i / 256, i % 256),
                        weight: 1,
                        healthy: true,
                        locality: None,
                    })
                    .collect();
            }
        }
        assert!(body.truncate_to_fit().expect("fits after cutting"));
        EncodedBody::new(&body).expect("fits");
        let RecordBody::Request(r) = &body else {
            panic!("still a request");
        };
        assert!(r.service_name.ends_with(TRUNCATED_MARK));
        assert!(r.service_name.len() <= NAME_MAX + TRUNCATED_MARK.len());
        assert!(r.telemetry.status.message.ends_with(TRUNCATED_MARK));
        let eps = &r
            .routing_decision
            .as_ref()
            .expect("kept")
            .available_endpoints;
        let last = eps.last().expect("a marker entry");
        assert!(last.address.starts_with(TRUNCATED_MARK), "{}", last.address);
        assert!(last.address.ends_with("more"));
        // What identifies it is whole.
        assert_eq!(r.telemetry.trace_id, orig.telemetry.trace_id);
        assert_eq!(r.telemetry.start_time, orig.telemetry.start_time);
        assert_eq!(r.telemetry.status_code, orig.telemetry.status_code);
        assert_eq!(r.mode, orig.mode);
        assert_eq!(r.identity, orig.identity);
    }

    #[test]
    fn a_body_that_fits_is_left_alone_and_shed_bodies_are_refused() {
        let mut body = samples::mode_transition();
        let before = body.clone();
        assert!(!body.truncate_to_fit().expect("fits"));
        assert_eq!(body, before);
        let mut actions = samples::mode_transition();
        if let RecordBody::ModeTransition(m) = &mut actions {
            m.actions = vec!["a".repeat(1000); 200];
        }
        assert!(actions.truncate_to_fit().expect("cut"));
        let RecordBody::ModeTransition(m) = &actions else {
            panic!("kind kept");
        };
        assert!(m.actions.len() <= 65);
        assert!(m
            .actions
            .iter()
            .all(|a| a.len() <= 1024 + TRUNCATED_MARK.len()));
    }
}
