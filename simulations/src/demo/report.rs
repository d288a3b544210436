//! What the demo measured, and the self-contained HTML report of it.
//!
//! What it is: the per-second timeline rows, the calls, the summary and a
//! renderer to HTML with an inline SVG timeline, all plain data. Who
//! drives it: [`super::run`] fills it; `tidemesh-demo` writes it. What it
//! must not do: any I/O (the caller writes the strings it returns).

use std::fmt::Write as _;

use serde::Serialize;

/// Which call path a request took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    /// pos (spoke A) -> inventory (spoke B), same store.
    SameSite,
    /// pos (spoke A) -> payments.cloud through the hub gateway.
    Cloud,
}

/// Where in the story a moment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Hub reachable, before the blackout.
    Before,
    /// The relay drops everything between the store and the hub.
    Outage,
    /// Healed.
    After,
}

/// One request of the loop.
#[derive(Debug, Clone, Serialize)]
pub struct Call {
    /// Milliseconds since the timeline started, when the call was made.
    pub at_ms: u64,
    /// Its path.
    pub path: Path,
    /// Phase when it was made.
    pub phase: Phase,
    /// Status (0: no answer).
    pub status: u16,
    /// Milliseconds it took.
    pub latency_ms: u64,
    /// Why it failed (empty when it did not).
    pub reason: String,
}

impl Call {
    /// Whether the app got a 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// One second of the timeline.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Second {
    /// Seconds since the timeline started.
    pub t: u64,
    /// Phase at the sample.
    pub phase: Option<Phase>,
    /// Spoke A's (pos) mode, from its status.
    pub mode_a: String,
    /// Spoke B's (inventory) mode.
    pub mode_b: String,
    /// Spoke A's control state (`connected` / `disconnected`).
    pub state_a: String,
    /// Same-site calls answered 2xx in this second.
    pub same_ok: u64,
    /// Same-site calls failed in this second.
    pub same_fail: u64,
    /// Cloud calls answered 2xx in this second.
    pub cloud_ok: u64,
    /// Cloud calls failed in this second.
    pub cloud_fail: u64,
    /// Evidence records waiting for the hub's ack, both spokes.
    pub backlog: u64,
    /// Records committed on both spokes (sum of last committed seqs).
    pub committed: u64,
    /// Records the hub acked, both spokes.
    pub acked: u64,
    /// Spoke A's survival horizon, seconds.
    pub horizon_s: Option<u64>,
    /// Seconds left on pos's workload SVID.
    pub svid_left_s: Option<i64>,
    /// pos's workload SVID expiry.
    pub svid_not_after: String,
    /// Who issued pos's SVID ("hub" or "node CA ...").
    pub svid_issuer: String,
}

/// One spoke's evidence, spoke side and hub side, at the end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EvidenceCheck {
    /// The spoke's node ID.
    pub spoke: String,
    /// Its last committed sequence number.
    pub last_committed_seq: u64,
    /// Records still waiting for the hub.
    pub pending_records: u64,
    /// The hub's high-water mark for it.
    pub hub_high_water_mark: u64,
    /// Record rows the hub holds for it.
    pub hub_records: u64,
    /// Rows beyond one per sequence number (0: no duplicates stored).
    pub duplicates_stored: i64,
    /// Redeliveries the hub recognised and skipped.
    pub redeliveries_skipped: u64,
    /// Gaps and chain breaks.
    pub gaps: u64,
    /// `tidemesh-hub evidence verify` passed.
    pub verify_ok: bool,
    /// All of the above: every record once, chain intact.
    pub exactly_once: bool,
}

/// Calls of one path in one phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PathStats {
    /// Answered 2xx.
    pub ok: u64,
    /// Failed (any other status or no answer).
    pub failed: u64,
    /// Slowest failure, milliseconds.
    pub max_failure_ms: u64,
    /// Slowest success, milliseconds.
    pub max_ok_ms: u64,
}

impl PathStats {
    fn of<'a>(calls: impl Iterator<Item = &'a Call>) -> PathStats {
        let mut s = PathStats::default();
        for c in calls {
            if c.ok() {
                s.ok += 1;
                s.max_ok_ms = s.max_ok_ms.max(c.latency_ms);
            } else {
                s.failed += 1;
                s.max_failure_ms = s.max_failure_ms.max(c.latency_ms);
            }
        }
        s
    }
}

/// The run's outcome: what the summary prints and CI checks.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// `short` or `full`.
    pub profile: String,
    /// Workload SVID lifetime given to the hub, seconds.
    pub workload_ttl_s: u64,
    /// Seconds from the blackout to the heal.
    pub outage_s: f64,
    /// Seconds from the blackout until spoke A reported Survival.
    pub survival_after_s: Option<f64>,
    /// Seconds from the blackout until spoke A reported the hub unreachable.
    pub hub_lost_noticed_after_s: Option<f64>,
    /// Slowest failed cloud call made during the outage before spoke A
    /// reported the hub unreachable, milliseconds.
    pub cloud_max_failure_ms_before_notice: Option<u64>,
    /// Slowest failed cloud call made once spoke A reported the hub
    /// unreachable, milliseconds.
    pub cloud_max_failure_ms_after_notice: Option<u64>,
    /// Seconds from the heal until spoke A was back in Target.
    pub target_after_heal_s: Option<f64>,
    /// Seconds from the heal until both backlogs were empty.
    pub drained_after_heal_s: Option<f64>,
    /// Same-site calls before, during and after the outage.
    pub same_site: [PathStats; 3],
    /// Cloud calls before, during and after the outage.
    pub cloud: [PathStats; 3],
    /// Distinct pos SVIDs seen during the outage (renewed offline).
    pub svids_during_outage: u64,
    /// Whether an SVID issued by the spoke's node CA was seen.
    pub svid_issued_offline: bool,
    /// Largest evidence backlog seen (records, both spokes).
    pub max_backlog: u64,
    /// Per spoke.
    pub evidence: Vec<EvidenceCheck>,
    /// Every spoke's evidence delivered exactly once.
    pub exactly_once: bool,
    /// Where the HTML report is.
    pub report: String,
    /// Seconds the timeline ran.
    pub duration_s: f64,
}

impl Summary {
    /// Fills the call statistics from `calls`.
    pub fn count_calls(&mut self, calls: &[Call]) {
        for (i, phase) in [Phase::Before, Phase::Outage, Phase::After]
            .into_iter()
            .enumerate()
        {
            self.same_site[i] = PathStats::of(
                calls
                    .iter()
                    .filter(|c| c.path == Path::SameSite && c.phase == phase),
            );
            self.cloud[i] = PathStats::of(
                calls
                    .iter()
                    .filter(|c| c.path == Path::Cloud && c.phase == phase),
            );
        }
    }

    /// The closing lines of the console.
    pub fn lines(&self) -> Vec<String> {
        let during = |s: &PathStats| format!("{} ok, {} failed", s.ok, s.failed);
        let mut out = vec![
            format!(
                "hub outage: {:.0} s (workload SVID lifetime {} s); Survival {} after the cut; Target again {} after the heal",
                self.outage_s,
                self.workload_ttl_s,
                secs(self.survival_after_s),
                secs(self.target_after_heal_s)
            ),
            format!(
                "same-site (pos -> inventory) during the outage: {}",
                during(&self.same_site[1])
            ),
            format!(
                "cloud (pos -> payments.cloud) during the outage: {}; failed fast: slowest {} once the spoke knew the hub was lost ({} after the cut), {} before that",
                during(&self.cloud[1]),
                ms(self.cloud_max_failure_ms_after_notice),
                secs(self.hub_lost_noticed_after_s),
                ms(self.cloud_max_failure_ms_before_notice),
            ),
            format!(
                "workload SVIDs: {} distinct during the outage{}",
                self.svids_during_outage,
                if self.svid_issued_offline {
                    ", renewed offline by the spoke's node CA"
                } else {
                    ""
                }
            ),
            format!(
                "evidence: backlog peaked at {} records, drained {} after the heal",
                self.max_backlog,
                secs(self.drained_after_heal_s)
            ),
        ];
        for e in &self.evidence {
            out.push(format!(
                "  {}: spoke committed {} = hub high-water mark {}, {} rows, {} duplicates stored, {} redeliveries skipped, gaps {}, verify {}",
                e.spoke,
                e.last_committed_seq,
                e.hub_high_water_mark,
                e.hub_records,
                e.duplicates_stored,
                e.redeliveries_skipped,
                e.gaps,
                if e.verify_ok { "ok" } else { "FAILED" }
            ));
        }
        out.push(format!(
            "records delivered exactly once: {}",
            if self.exactly_once { "yes" } else { "NO" }
        ));
        out
    }
}

fn ms(m: Option<u64>) -> String {
    m.map(|m| format!("{m} ms")).unwrap_or_else(|| "-".into())
}

fn secs(s: Option<f64>) -> String {
    s.map(|s| format!("{s:.1} s"))
        .unwrap_or_else(|| "never".into())
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn mode_color(mode: &str) -> &'static str {
    match mode {
        "target" => "#2e9d57",
        "degraded" => "#e08a1e",
        "recovery" => "#e6c229",
        "survival" => "#c8372d",
        _ => "#9aa0a6",
    }
}

/// The report: a summary table and the SVG timeline, one file, no
/// external resources.
pub fn html(seconds: &[Second], events: &[(f64, String)], s: &Summary) -> String {
    let svg = svg(seconds, events);
    let mut rows = String::new();
    for (name, stats) in [
        ("same-site: pos → inventory", &s.same_site),
        ("cloud: pos → payments.cloud", &s.cloud),
    ] {
        let _ = write!(rows, "<tr><th>{}</th>", esc(name));
        for p in stats.iter() {
            let _ = write!(
                rows,
                "<td>{} ok / <span class=\"{}\">{} failed</span><br><small>{}</small></td>",
                p.ok,
                if p.failed > 0 { "bad" } else { "" },
                p.failed,
                if p.failed > 0 {
                    format!("slowest failure {} ms", p.max_failure_ms)
                } else {
                    "no failures".into()
                }
            );
        }
        rows.push_str("</tr>");
    }
    let mut ev = String::new();
    for e in &s.evidence {
        let _ = write!(
            ev,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&e.spoke),
            e.last_committed_seq,
            e.hub_high_water_mark,
            e.hub_records,
            e.duplicates_stored,
            e.gaps,
            if e.verify_ok { "ok" } else { "FAILED" }
        );
    }
    let summary = s
        .lines()
        .iter()
        .map(|l| format!("<li>{}</li>", esc(l.trim())))
        .collect::<String>();
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tidemesh demo: a hub outage at store sf01</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #202124; }}
h1 {{ font-size: 20px; margin: 0 0 4px; }}
p.lead {{ margin: 0 0 12px; color: #5f6368; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; }}
td, th {{ border: 1px solid #dadce0; padding: 4px 10px; text-align: left; vertical-align: top; }}
.bad {{ color: #c8372d; font-weight: 600; }}
.ok {{ color: #2e9d57; font-weight: 600; }}
ul {{ margin: 4px 0 12px; }}
</style></head><body>
<h1>tidemesh demo: store sf01 through a {outage:.0} s hub outage</h1>
<p class="lead">Hub, two spokes at one store behind <code>tidemesh-relay</code>; pos (spoke A) calls inventory (spoke B, same site) and payments.cloud (through the hub gateway) in a steady loop. Workload SVIDs live {ttl} s, shorter than the outage. During the outage the cloud calls fail at once (the hub is unreachable); after the heal they are refused fast until the Recovery ramp admits them again. Evidence recorded offline is synced after the heal, exactly once: <span class="{eo_class}">{eo}</span>.</p>
{svg}
<table><tr><th>requests</th><th>before the outage</th><th>during the outage</th><th>after the heal</th></tr>{rows}</table>
<table><tr><th>spoke</th><th>last committed seq</th><th>hub high-water mark</th><th>hub rows</th><th>duplicates stored</th><th>gaps</th><th>evidence verify</th></tr>{ev}</table>
<ul>{summary}</ul>
</body></html>
"#,
        outage = s.outage_s,
        ttl = s.workload_ttl_s,
        eo_class = if s.exactly_once { "ok" } else { "bad" },
        eo = if s.exactly_once { "yes" } else { "NO" },
    )
}

/// Where event labels go: the first of a few rows at the top where a label
/// does not run into one already placed; (x, row, anchor) per event.
fn place_labels(events: &[(f64, &str)], right_edge: f64) -> Vec<(f64, usize, &'static str)> {
    const ROWS: usize = 2;
    // bold 12 px text, about 7.5 px a character, plus a gap
    let width = |l: &str| l.chars().count() as f64 * 7.5 + 8.0;
    let mut taken: Vec<Vec<(f64, f64)>> = vec![Vec::new(); ROWS];
    let mut out = Vec::new();
    for &(ex, label) in events {
        let w = width(label);
        // near the right edge the label goes to the left of its line
        let (x0, x1, tx, anchor) = if ex + 4.0 + w > right_edge {
            (ex - 4.0 - w, ex, ex - 4.0, "end")
        } else {
            (ex, ex + 4.0 + w, ex + 4.0, "start")
        };
        let row = (0..ROWS)
            .find(|r| taken[*r].iter().all(|(a, b)| x1 <= *a || x0 >= *b))
            .unwrap_or(ROWS - 1);
        taken[row].push((x0, x1));
        out.push((tx, row, anchor));
    }
    out
}

/// The timeline: event labels, mode bands, one lane of requests per path
/// (answered per second as a line, failures as bars), the evidence backlog
/// and the sync, on one time axis.
pub fn svg(seconds: &[Second], events: &[(f64, String)]) -> String {
    const W: f64 = 1300.0;
    const LEFT: f64 = 200.0;
    const RIGHT: f64 = 20.0;
    let span = seconds.last().map(|s| s.t + 1).unwrap_or(1).max(1) as f64;
    let pw = W - LEFT - RIGHT;
    let x = |t: f64| LEFT + t / span * pw;
    let mut o = String::new();
    // rows of event labels, mode bands, then the panels
    let ev_top = 16.0;
    let ev_row = 15.0;
    let modes_top = ev_top + 2.0 * ev_row + 2.0;
    let h = modes_top + 610.0;
    let axis_y = h - 26.0;
    let _ = write!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="system-ui, sans-serif" font-size="12">"#
    );
    // the outage, shaded across every panel
    let outage: Vec<&Second> = seconds
        .iter()
        .filter(|s| s.phase == Some(Phase::Outage))
        .collect();
    if let (Some(a), Some(b)) = (outage.first(), outage.last()) {
        let _ = write!(
            o,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#c8372d" fill-opacity="0.07"/>"##,
            x(a.t as f64),
            modes_top - 4.0,
            x((b.t + 1) as f64) - x(a.t as f64),
            axis_y - modes_top + 4.0
        );
    }
    // modes
    let band = |o: &mut String, y: f64, label: &str, mode: &dyn Fn(&Second) -> &str| {
        let _ = write!(
            o,
            r#"<text x="8" y="{:.1}">{}</text>"#,
            y + 14.0,
            esc(label)
        );
        // one rectangle per run of the same mode
        let mut i = 0;
        while i < seconds.len() {
            let m = mode(&seconds[i]);
            let mut j = i;
            while j + 1 < seconds.len() && mode(&seconds[j + 1]) == m {
                j += 1;
            }
            let (from, to) = (seconds[i].t, seconds[j].t + 1);
            let _ = write!(
                o,
                r#"<rect x="{:.1}" y="{y}" width="{:.2}" height="20" fill="{}"><title>{from}s to {to}s: {}</title></rect>"#,
                x(from as f64),
                x(to as f64) - x(from as f64),
                mode_color(m),
                esc(m)
            );
            i = j + 1;
        }
    };
    band(&mut o, modes_top, "mode: spoke A (pos)", &|s| {
        s.mode_a.as_str()
    });
    band(&mut o, modes_top + 24.0, "mode: spoke B (inv.)", &|s| {
        s.mode_b.as_str()
    });
    let mut lx = LEFT;
    for m in ["target", "survival", "recovery", "degraded"] {
        let _ = write!(
            o,
            r#"<rect x="{lx}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{}" y="{:.1}">{m}</text>"#,
            modes_top + 50.0,
            mode_color(m),
            lx + 16.0,
            modes_top + 60.0
        );
        lx += 90.0;
    }
    // a panel: frame, title, y ticks at 0, half and the top with faint
    // grid lines
    let panel = |o: &mut String, top: f64, height: f64, title: &str, max: f64| {
        let _ = write!(
            o,
            r##"<rect x="{LEFT}" y="{top}" width="{pw}" height="{height}" fill="none" stroke="#dadce0"/><text x="8" y="{:.1}" font-weight="600">{}</text>"##,
            top + 14.0,
            esc(title),
        );
        for (frac, v) in [(0.0, 0.0), (0.5, max / 2.0), (1.0, max)] {
            let y = top + height - frac * height;
            let label = if v.fract() == 0.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            };
            let _ = write!(
                o,
                r##"<line x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#e8eaed"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#5f6368">{label}</text>"##,
                LEFT + pw,
                LEFT - 6.0,
                y + 4.0
            );
        }
    };
    let line = |o: &mut String,
                top: f64,
                height: f64,
                max: f64,
                color: &str,
                v: &dyn Fn(&Second) -> f64| {
        let pts: Vec<String> = seconds
            .iter()
            .map(|s| {
                format!(
                    "{:.1},{:.1}",
                    x(s.t as f64 + 0.5),
                    top + height - (v(s) / max).min(1.0) * height
                )
            })
            .collect();
        let _ = write!(
            o,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            pts.join(" ")
        );
    };
    let legend = |o: &mut String, y: f64, items: &[(&str, &str)]| {
        let mut lx = LEFT + 8.0;
        for (color, label) in items {
            let _ = write!(
                o,
                r#"<rect x="{lx}" y="{:.1}" width="12" height="4" fill="{color}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                y - 4.0,
                lx + 16.0,
                y,
                esc(label)
            );
            lx += 30.0 + label.chars().count() as f64 * 7.0;
        }
    };
    // one lane per path: calls answered per second, failures as bars; the
    // same scale in both
    let rmax = seconds
        .iter()
        .map(|s| (s.same_ok + s.same_fail).max(s.cloud_ok + s.cloud_fail))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let bw = (x(1.0) - x(0.0) - 1.0).max(1.0);
    type Count = fn(&Second) -> u64;
    let lanes: [(&str, Count, Count, &str, &str, &str, &str); 2] = [
        (
            "same-site requests / s",
            |s| s.same_ok,
            |s| s.same_fail,
            "#1a73e8",
            "answered (pos → inventory, spoke B)",
            "#7b1fa2",
            "failed",
        ),
        (
            "cloud requests / s",
            |s| s.cloud_ok,
            |s| s.cloud_fail,
            "#12b5cb",
            "answered (pos → payments.cloud, hub gateway)",
            "#c8372d",
            "failed",
        ),
    ];
    let ph = 100.0;
    let mut top = modes_top + 80.0;
    for (title, ok, fail, ok_color, ok_label, fail_color, fail_label) in lanes {
        panel(&mut o, top, ph, title, rmax);
        for s in seconds {
            let n = fail(s);
            if n > 0 {
                let bh = (n as f64 / rmax).min(1.0) * ph;
                let _ = write!(
                    o,
                    r#"<rect x="{:.1}" y="{:.1}" width="{bw:.2}" height="{bh:.1}" fill="{fail_color}" fill-opacity="0.75"><title>{}s: {n} failed</title></rect>"#,
                    x(s.t as f64) + 0.5,
                    top + ph - bh,
                    s.t
                );
            }
        }
        line(&mut o, top, ph, rmax, ok_color, &|s| ok(s) as f64);
        legend(
            &mut o,
            top + ph + 16.0,
            &[(ok_color, ok_label), (fail_color, fail_label)],
        );
        top += ph + 30.0;
    }
    // evidence backlog
    let ph2 = 90.0;
    let bmax = seconds.iter().map(|s| s.backlog).max().unwrap_or(1).max(1) as f64;
    panel(&mut o, top, ph2, "evidence backlog", bmax);
    let pts: Vec<String> = seconds
        .iter()
        .map(|s| {
            format!(
                "{:.1},{:.1}",
                x(s.t as f64 + 0.5),
                top + ph2 - (s.backlog as f64 / bmax) * ph2
            )
        })
        .collect();
    if let (Some(f), Some(l)) = (seconds.first(), seconds.last()) {
        let _ = write!(
            o,
            r##"<polygon points="{:.1},{:.1} {} {:.1},{:.1}" fill="#f9ab00" fill-opacity="0.35" stroke="#f9ab00" stroke-width="2"/>"##,
            x(f.t as f64 + 0.5),
            top + ph2,
            pts.join(" "),
            x(l.t as f64 + 0.5),
            top + ph2
        );
    }
    legend(
        &mut o,
        top + ph2 + 16.0,
        &[("#f9ab00", "records waiting for the hub (both spokes)")],
    );
    top += ph2 + 30.0;
    // sync: committed on the spokes vs acked by the hub
    let ph3 = 90.0;
    let smax = seconds
        .iter()
        .map(|s| s.committed)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    panel(&mut o, top, ph3, "evidence sync (seq)", smax);
    line(&mut o, top, ph3, smax, "#5f6368", &|s| s.committed as f64);
    line(&mut o, top, ph3, smax, "#2e9d57", &|s| s.acked as f64);
    legend(
        &mut o,
        top + ph3 + 16.0,
        &[
            ("#5f6368", "committed on the spokes"),
            ("#2e9d57", "acked by the hub (high-water mark)"),
        ],
    );
    // time axis and events
    let step = if span > 60.0 { 10 } else { 5 };
    let mut t = 0;
    while (t as f64) <= span {
        let _ = write!(
            o,
            r##"<line x1="{0:.1}" x2="{0:.1}" y1="{1:.1}" y2="{2:.1}" stroke="#5f6368"/><text x="{0:.1}" y="{3:.1}" text-anchor="middle" fill="#5f6368">{t}s</text>"##,
            x(t as f64),
            axis_y - 4.0,
            axis_y,
            axis_y + 14.0
        );
        t += step;
    }
    let at: Vec<(f64, &str)> = events.iter().map(|(t, l)| (x(*t), l.as_str())).collect();
    for ((ex, label), (tx, row, anchor)) in at.iter().zip(place_labels(&at, W - RIGHT)) {
        let ty = ev_top + row as f64 * ev_row;
        let _ = write!(
            o,
            r##"<line x1="{ex:.1}" x2="{ex:.1}" y1="{:.1}" y2="{:.1}" stroke="#202124" stroke-dasharray="4 3"/><text x="{tx:.1}" y="{ty:.1}" text-anchor="{anchor}" font-weight="600">{}</text>"##,
            ty - 10.0,
            axis_y - 4.0,
            esc(label)
        );
    }
    o.push_str("</svg>");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sec(t: u64, phase: Phase, mode: &str) -> Second {
        Second {
            t,
            phase: Some(phase),
            mode_a: mode.into(),
            mode_b: mode.into(),
            same_ok: 10,
            cloud_ok: if phase == Phase::Outage { 0 } else { 10 },
            cloud_fail: if phase == Phase::Outage { 10 } else { 0 },
            backlog: t * 3,
            committed: t * 20,
            acked: t * 10,
            ..Default::default()
        }
    }

    #[test]
    fn event_labels_close_together_take_separate_rows() {
        // "heal" and "Target" 8 px apart, "blackout" far from both, one
        // label at the right edge
        let placed = place_labels(
            &[
                (300.0, "hub blackout"),
                (1000.0, "heal"),
                (1008.0, "Target"),
                (1275.0, "end"),
            ],
            1280.0,
        );
        assert_eq!(placed[0], (304.0, 0, "start"));
        assert_eq!(placed[1], (1004.0, 0, "start"));
        assert_eq!(placed[2].1, 1, "Target moves to the second row");
        assert_eq!(placed[3], (1271.0, 0, "end"));
    }

    #[test]
    fn the_report_has_every_panel_and_escapes_text() {
        let seconds: Vec<Second> = (0..30)
            .map(|t| {
                let p = match t {
                    0..10 => Phase::Before,
                    10..20 => Phase::Outage,
                    _ => Phase::After,
                };
                sec(
                    t,
                    p,
                    if p == Phase::Outage {
                        "survival"
                    } else {
                        "target"
                    },
                )
            })
            .collect();
        let calls = vec![Call {
            at_ms: 12_000,
            path: Path::Cloud,
            phase: Phase::Outage,
            status: 503,
            latency_ms: 3,
            reason: "hub unreachable".into(),
        }];
        let mut s = Summary {
            evidence: vec![EvidenceCheck {
                spoke: "spiffe://x/<a>".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        s.count_calls(&calls);
        assert_eq!((s.cloud[1].failed, s.cloud[1].max_failure_ms), (1, 3));
        let page = html(&seconds, &[(10.0, "blackout".into())], &s);
        assert!(page.contains("<svg"), "svg inline");
        for part in [
            "same-site requests / s",
            "cloud requests / s",
            "evidence backlog",
            "evidence sync",
            "mode: spoke A",
            "blackout",
            mode_color("survival"),
        ] {
            assert!(page.contains(part), "{part}");
        }
        assert!(page.contains("spiffe://x/&lt;a&gt;"));
        assert!(!page.contains("<a>"));
        // self-contained: nothing loaded from elsewhere
        assert!(!page.contains(" src=") && !page.contains(" href="));
    }
}
