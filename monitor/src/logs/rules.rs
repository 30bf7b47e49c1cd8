//! The rules, and the [`Evaluator`] that feeds them lines and turns their
//! windows into [`LogEvent`]s.
//!
//! Windows are on the monitor's clock at the time a line is read, not on
//! timestamps inside the lines: a line's own clock may be skewed or
//! missing. A backlog read at once (`start_at = "beginning"`) therefore
//! lands in one window.
//!
//! - A [`PatternRule`] counts matching lines per file exactly (a sliding
//!   window); it fires when the count reaches its threshold and resolves
//!   once a whole window has passed without a match.
//! - An [`ErrorRateRule`] counts requests and 5xx answers per service in
//!   [`RATE_SLOTS`] slots of the window; it fires while the 5xx share is
//!   at or above its threshold with at least `min_requests` requests, and
//!   resolves when that no longer holds.

use std::{
    collections::{BTreeMap, VecDeque},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use mesh_runtime::duration::HumanDuration;
use serde::Deserialize;

use super::{LogEvent, glob::Glob};
use crate::alert::Severity;

/// The slots an error-rate window is counted in.
pub const RATE_SLOTS: u32 = 20;

/// Sample lines kept as a pattern rule's evidence.
const SAMPLES: usize = 3;

/// A sample line is cut to this many characters.
const SAMPLE_CHARS: usize = 300;

/// Match times kept per file beyond the threshold: enough to show how many
/// there were, bounded however many there are.
const MAX_TRACKED: usize = 10_000;

/// A checked rule.
#[derive(Clone, Debug)]
pub enum Rule {
    /// Lines matching a pattern.
    Pattern(PatternRule),
    /// The 5xx rate per service.
    ErrorRate(ErrorRateRule),
}

/// Fires when at least `threshold` lines of one file match within `window`.
#[derive(Clone, Debug)]
pub struct PatternRule {
    /// Its name.
    pub name: String,
    /// The files it reads.
    pub files: Glob,
    /// What a line must contain.
    pub matcher: Matcher,
    /// Matching lines within the window that fire it.
    pub threshold: u32,
    /// The window.
    pub window: Duration,
    /// How bad.
    pub severity: Severity,
}

/// Fires when a service's 5xx share within `window` is at least
/// `threshold` over at least `min_requests` requests.
#[derive(Clone, Debug)]
pub struct ErrorRateRule {
    /// Its name.
    pub name: String,
    /// The access logs it reads.
    pub files: Glob,
    /// The window.
    pub window: Duration,
    /// The 5xx share that fires, in (0, 1].
    pub threshold: f64,
    /// Requests below which a service is not judged.
    pub min_requests: u32,
    /// Only requests logged in this direction; none for both.
    pub direction: Option<String>,
    /// How bad.
    pub severity: Severity,
}

/// What a pattern rule looks for in a line.
#[derive(Clone, Debug)]
pub enum Matcher {
    /// A substring.
    Substring(String),
    /// A regular expression.
    Regex(regex::Regex),
}

/// The rules' windows.
#[derive(Debug)]
pub struct Evaluator {
    rules: Vec<Rule>,
    /// Slot 0 of every error-rate window.
    origin: Instant,
    /// Per pattern rule (by index) and file.
    patterns: BTreeMap<(usize, PathBuf), PatternWindow>,
    /// Per error-rate rule (by index) and service.
    rates: BTreeMap<(usize, String), RateWindow>,
    /// Per error-rate rule (by index): lines that were not access-log
    /// entries.
    unparsable: Vec<u64>,
    /// Per rule (by index): lines it counted, since the start.
    counted: Vec<u64>,
}

/// A pattern rule's matches in one file.
#[derive(Debug, Default)]
struct PatternWindow {
    hits: VecDeque<Instant>,
    samples: VecDeque<String>,
    firing: bool,
}

/// An error-rate rule's counts for one service.
#[derive(Debug, Default)]
struct RateWindow {
    /// (slot, requests, 5xx), oldest first.
    slots: VecDeque<(u64, u64, u64)>,
    firing: bool,
}

/// The fields of an access-log line that the rules read; others are
/// ignored.
#[derive(Deserialize)]
struct AccessLine {
    service: String,
    status: u16,
    #[serde(default)]
    direction: Option<String>,
}

// === impl Rule ===

impl Rule {
    /// Its name.
    pub fn name(&self) -> &str {
        match self {
            Self::Pattern(r) => &r.name,
            Self::ErrorRate(r) => &r.name,
        }
    }

    /// The files it reads.
    pub fn files(&self) -> &Glob {
        match self {
            Self::Pattern(r) => &r.files,
            Self::ErrorRate(r) => &r.files,
        }
    }
}

// === impl Matcher ===

impl Matcher {
    /// A substring matcher, or a regular expression when `regex`; the
    /// error says why the pattern is not accepted.
    pub fn new(pattern: &str, regex: bool) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("must not be empty".into());
        }
        if !regex {
            return Ok(Self::Substring(pattern.to_owned()));
        }
        regex::Regex::new(pattern)
            .map(Self::Regex)
            .map_err(|e| format!("{pattern:?} is not a valid regular expression: {e}"))
    }

    /// Whether `line` matches.
    pub fn is_match(&self, line: &str) -> bool {
        match self {
            Self::Substring(s) => line.contains(s.as_str()),
            Self::Regex(re) => re.is_match(line),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            Self::Substring(s) => s,
            Self::Regex(re) => re.as_str(),
        }
    }
}

// === impl Evaluator ===

impl Evaluator {
    /// Windows for `rules`, starting empty at `now`.
    pub fn new(rules: Vec<Rule>, now: Instant) -> Self {
        let unparsable = vec![0; rules.len()];
        let counted = vec![0; rules.len()];
        Self {
            rules,
            origin: now,
            patterns: BTreeMap::new(),
            rates: BTreeMap::new(),
            unparsable,
            counted,
        }
    }

    /// The rules.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Counts one line read from `path` at `now` into every rule that reads
    /// that file.
    pub fn observe(&mut self, path: &Path, line: &str, now: Instant) {
        for (i, rule) in self.rules.iter().enumerate() {
            if !rule.files().matches(path) {
                continue;
            }
            match rule {
                Rule::Pattern(r) if r.matcher.is_match(line) => {
                    let cap = (r.threshold as usize).max(MAX_TRACKED);
                    let w = self.patterns.entry((i, path.to_owned())).or_default();
                    w.record(now, line, cap);
                    self.counted[i] += 1;
                }
                Rule::Pattern(_) => {}
                Rule::ErrorRate(r) => match serde_json::from_str::<AccessLine>(line) {
                    Ok(entry) if r.direction.is_some() && entry.direction != r.direction => {}
                    Ok(entry) => {
                        let slot = slot_of(self.origin, now, r.window);
                        let error = (500..600).contains(&entry.status);
                        let w = self.rates.entry((i, entry.service)).or_default();
                        w.record(slot, error);
                        self.counted[i] += 1;
                    }
                    Err(_) => self.unparsable[i] += 1,
                },
            }
        }
    }

    /// Per rule, by name: the lines it counted since the start (a pattern
    /// rule's matches, an error-rate rule's requests).
    pub fn counted(&self) -> impl Iterator<Item = (&str, u64)> {
        self.rules
            .iter()
            .zip(&self.counted)
            .map(|(rule, n)| (rule.name(), *n))
    }

    /// Lines read by the error-rate rule `name` that were not access-log
    /// entries; none when there is no such rule.
    pub fn unparsable(&self, name: &str) -> Option<u64> {
        self.rules
            .iter()
            .position(|r| matches!(r, Rule::ErrorRate(r) if r.name == name))
            .map(|i| self.unparsable[i])
    }

    /// Moves every window to `now`: the rules that start or stop firing.
    pub fn evaluate(&mut self, now: Instant) -> Vec<LogEvent> {
        let mut events = Vec::new();
        for ((i, path), w) in &mut self.patterns {
            if let Rule::Pattern(rule) = &self.rules[*i] {
                events.extend(w.evaluate(rule, path, now));
            }
        }
        self.patterns.retain(|_, w| w.firing || !w.hits.is_empty());
        for ((i, service), w) in &mut self.rates {
            if let Rule::ErrorRate(rule) = &self.rules[*i] {
                let slot = slot_of(self.origin, now, rule.window);
                events.extend(w.evaluate(rule, service, slot));
            }
        }
        self.rates.retain(|_, w| w.firing || !w.slots.is_empty());
        events
    }
}

/// The error-rate slot `now` falls in.
fn slot_of(origin: Instant, now: Instant, window: Duration) -> u64 {
    let width = (window / RATE_SLOTS).as_nanos().max(1);
    (now.saturating_duration_since(origin).as_nanos() / width) as u64
}

// === impl PatternWindow ===

impl PatternWindow {
    fn record(&mut self, now: Instant, line: &str, cap: usize) {
        self.hits.push_back(now);
        if self.hits.len() > cap {
            self.hits.pop_front();
        }
        if self.samples.len() == SAMPLES {
            self.samples.pop_front();
        }
        self.samples
            .push_back(line.chars().take(SAMPLE_CHARS).collect());
    }

    fn evaluate(&mut self, rule: &PatternRule, path: &Path, now: Instant) -> Option<LogEvent> {
        while let Some(&first) = self.hits.front() {
            if now.saturating_duration_since(first) < rule.window {
                break;
            }
            self.hits.pop_front();
        }
        let count = self.hits.len();
        let key = format!("log:{}:{}", rule.name, path.display());
        let window = HumanDuration(rule.window);
        let pattern = rule.matcher.as_str();
        if !self.firing && count >= rule.threshold as usize {
            self.firing = true;
            return Some(LogEvent::Firing {
                key,
                rule: rule.name.clone(),
                severity: rule.severity,
                summary: format!(
                    "{count} lines matching {pattern:?} within {window} in {} (threshold {})",
                    path.display(),
                    rule.threshold
                ),
                evidence: self.samples.iter().cloned().collect(),
            });
        }
        if self.firing && count == 0 {
            self.firing = false;
            self.samples.clear();
            return Some(LogEvent::Resolved {
                key,
                rule: rule.name.clone(),
                summary: format!(
                    "no line matching {pattern:?} within {window} in {}",
                    path.display()
                ),
            });
        }
        if count == 0 {
            self.samples.clear();
        }
        None
    }
}

// === impl RateWindow ===

impl RateWindow {
    fn record(&mut self, slot: u64, error: bool) {
        match self.slots.back_mut() {
            Some((s, requests, errors)) if *s == slot => {
                *requests += 1;
                *errors += u64::from(error);
            }
            _ => self.slots.push_back((slot, 1, u64::from(error))),
        }
    }

    fn evaluate(&mut self, rule: &ErrorRateRule, service: &str, slot: u64) -> Option<LogEvent> {
        while let Some(&(s, _, _)) = self.slots.front() {
            if s + u64::from(RATE_SLOTS) > slot {
                break;
            }
            self.slots.pop_front();
        }
        let (requests, errors) = self
            .slots
            .iter()
            .fold((0, 0), |(r, e), &(_, sr, se)| (r + sr, e + se));
        let rate = if requests == 0 {
            0.0
        } else {
            errors as f64 / requests as f64
        };
        let bad = requests >= u64::from(rule.min_requests) && rate >= rule.threshold;
        let key = format!("log:{}:{service}", rule.name);
        let window = HumanDuration(rule.window);
        let percent = rate * 100.0;
        if bad && !self.firing {
            self.firing = true;
            return Some(LogEvent::Firing {
                key,
                rule: rule.name.clone(),
                severity: rule.severity,
                summary: format!(
                    "{service}: {percent:.1}% of requests failed with 5xx within {window} \
                     (threshold {:.1}%)",
                    rule.threshold * 100.0
                ),
                evidence: vec![format!("{errors} of {requests} requests answered 5xx")],
            });
        }
        if !bad && self.firing {
            self.firing = false;
            return Some(LogEvent::Resolved {
                key,
                rule: rule.name.clone(),
                summary: format!(
                    "{service}: {percent:.1}% of {requests} requests failed with 5xx within {window}"
                ),
            });
        }
        None
    }
}
