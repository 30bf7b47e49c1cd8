//! The log watcher's configuration: [`LogsConfig`] as written (a TOML or
//! JSON table; in mesh-monitor's config file, the `[logs]` table, its rules
//! `[[logs.patterns]]` and `[[logs.error_rates]]`), and [`Logs`], the
//! checked values with defaults applied by [`LogsConfig::validate`].
//!
//! ```toml
//! state_file = "/var/lib/mesh-monitor/logs.json"
//!
//! [[patterns]]
//! name = "proxy-panics"
//! files = "/var/log/mesh/proxy-error.log"
//! pattern = "panicked at"
//! threshold = 1
//! window = "5m"
//! severity = "critical"
//!
//! [[error_rates]]
//! name = "proxy-5xx"
//! files = "/var/log/mesh/proxy-access*.log"
//! window = "1m"
//! threshold = 0.05
//! min_requests = 20
//! direction = "inbound"
//! ```

use std::{collections::HashSet, path::PathBuf, time::Duration};

use mesh_runtime::duration::HumanDuration;
use serde::{Deserialize, Serialize};

use super::{
    glob::Glob,
    rules::{ErrorRateRule, Matcher, PatternRule, Rule},
    tail::{StartAt, TailOptions},
};
use crate::alert::Severity;

/// The longest window a rule may have.
const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// The log watcher's settings and rules, as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsConfig {
    /// How often files are read [default: 250ms].
    #[serde(default)]
    pub poll_interval: Option<HumanDuration>,
    /// How often globs are expanded again [default: 5s].
    #[serde(default)]
    pub rescan_interval: Option<HumanDuration>,
    /// How long a rotated-away file is still read after it last grew
    /// [default: 5s].
    #[serde(default)]
    pub rotate_wait: Option<HumanDuration>,
    /// Where files that exist at start are read from: beginning or end
    /// [default: end].
    #[serde(default)]
    pub start_at: Option<StartAt>,
    /// The longest line read whole, in bytes; longer ones are cut
    /// [default: 65536].
    #[serde(default)]
    pub max_line_bytes: Option<usize>,
    /// Where read offsets are kept, so that a restart neither reads a line
    /// again nor skips one [default: none, not kept].
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// Rules counting lines that match a pattern.
    #[serde(default)]
    pub patterns: Vec<PatternRuleConfig>,
    /// Rules on the 5xx rate per service in the proxy's access logs.
    #[serde(default)]
    pub error_rates: Vec<ErrorRateRuleConfig>,
}

/// A pattern rule as written: at least `threshold` lines matching
/// `pattern` within `window` in one file of `files`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternRuleConfig {
    /// The rule's name, in alert keys: letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// The files, a glob (`/var/log/svc/*/app.log`).
    pub files: String,
    /// What a line must contain.
    pub pattern: String,
    /// Whether `pattern` is a regular expression instead of a substring.
    #[serde(default)]
    pub regex: bool,
    /// Matching lines within the window that fire the rule, at least 1.
    pub threshold: u32,
    /// The window.
    pub window: HumanDuration,
    /// How bad [default: warning].
    #[serde(default)]
    pub severity: Option<Severity>,
}

/// An error-rate rule as written: per service, the share of 5xx answers
/// in the access log within `window`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorRateRuleConfig {
    /// The rule's name, in alert keys: letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// The proxy's access logs, a glob.
    pub files: String,
    /// The window.
    pub window: HumanDuration,
    /// The 5xx share that fires, above 0 and at most 1 (`0.05` is 5%).
    pub threshold: f64,
    /// Requests within the window below which a service is not judged,
    /// so that one failure of a quiet service does not page; at least 1.
    pub min_requests: u32,
    /// Only requests the proxy logged in this direction, `inbound` or
    /// `outbound` (a request between two meshed services is logged by the
    /// caller's proxy and by the callee's) [default: both].
    #[serde(default)]
    pub direction: Option<String>,
    /// How bad [default: critical].
    #[serde(default)]
    pub severity: Option<Severity>,
}

/// The checked configuration.
#[derive(Clone, Debug)]
pub struct Logs {
    /// How often files are read.
    pub poll_interval: Duration,
    /// How often globs are expanded again.
    pub rescan_interval: Duration,
    /// How files are read.
    pub tail: TailOptions,
    /// Where read offsets are kept.
    pub state_file: Option<PathBuf>,
    /// The rules.
    pub rules: Vec<Rule>,
}

/// What is wrong with a [`LogsConfig`].
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A setting outside the rules.
    #[error("logs: {key} = {value}: {reason}")]
    Setting {
        /// The key.
        key: &'static str,
        /// Its value as given.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A field of one rule.
    #[error("logs rule {rule:?}: {field}: {reason}")]
    Rule {
        /// The rule's name (or its place, `patterns[2]`, when it has none).
        rule: String,
        /// The field.
        field: &'static str,
        /// What is wrong, with the value.
        reason: String,
    },
}

// === impl LogsConfig ===

impl LogsConfig {
    /// Checks every value and applies the defaults.
    pub fn validate(self) -> Result<Logs, ConfigError> {
        let poll_interval = duration_setting("poll_interval", self.poll_interval, 250)?;
        let rescan_interval = duration_setting("rescan_interval", self.rescan_interval, 5000)?;
        let rotate_wait = duration_setting("rotate_wait", self.rotate_wait, 5000)?;
        let max_line = self.max_line_bytes.unwrap_or(64 * 1024);
        if !(256..=16 << 20).contains(&max_line) {
            return Err(ConfigError::Setting {
                key: "max_line_bytes",
                value: max_line.to_string(),
                reason: "must be from 256 to 16777216",
            });
        }
        let mut names = HashSet::new();
        let mut rules = Vec::new();
        for (i, rule) in self.patterns.into_iter().enumerate() {
            let rule = rule.validate(i)?;
            unique(&mut names, &rule.name)?;
            rules.push(Rule::Pattern(rule));
        }
        for (i, rule) in self.error_rates.into_iter().enumerate() {
            let rule = rule.validate(i)?;
            unique(&mut names, &rule.name)?;
            rules.push(Rule::ErrorRate(rule));
        }
        Ok(Logs {
            poll_interval,
            rescan_interval,
            tail: TailOptions {
                start_at: self.start_at.unwrap_or_default(),
                max_line,
                rotate_wait,
            },
            state_file: self.state_file,
            rules,
        })
    }
}

/// A positive duration setting, `default_ms` when not given.
fn duration_setting(
    key: &'static str,
    value: Option<HumanDuration>,
    default_ms: u64,
) -> Result<Duration, ConfigError> {
    let value = value.map_or(Duration::from_millis(default_ms), HumanDuration::get);
    if value.is_zero() || value > MAX_WINDOW {
        return Err(ConfigError::Setting {
            key,
            value: HumanDuration(value).to_string(),
            reason: "must be above 0 and at most 24h",
        });
    }
    Ok(value)
}

fn unique(names: &mut HashSet<String>, name: &str) -> Result<(), ConfigError> {
    if names.insert(name.to_owned()) {
        Ok(())
    } else {
        Err(rule_error(
            name,
            "name",
            "another rule has the same name".into(),
        ))
    }
}

fn rule_error(rule: &str, field: &'static str, reason: String) -> ConfigError {
    ConfigError::Rule {
        rule: rule.to_owned(),
        field,
        reason,
    }
}

/// The checks every rule shares: its name (`what[i]` stands for a missing
/// one in errors), its files and its window.
fn common(
    what: &str,
    i: usize,
    name: &str,
    files: &str,
    window: HumanDuration,
) -> Result<(Glob, Duration), ConfigError> {
    let label = if name.is_empty() {
        format!("{what}[{i}]")
    } else {
        name.to_owned()
    };
    let name_ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !name_ok {
        return Err(rule_error(
            &label,
            "name",
            format!("{name:?} must be non-empty letters, digits, '-', '_' or '.'"),
        ));
    }
    let files = Glob::new(files).map_err(|e| rule_error(name, "files", e.to_string()))?;
    let window = window.get();
    if window.is_zero() || window > MAX_WINDOW {
        return Err(rule_error(
            name,
            "window",
            format!("{} must be above 0 and at most 24h", HumanDuration(window)),
        ));
    }
    Ok((files, window))
}

// === impl PatternRuleConfig ===

impl PatternRuleConfig {
    fn validate(self, i: usize) -> Result<PatternRule, ConfigError> {
        let (files, window) = common("patterns", i, &self.name, &self.files, self.window)?;
        let matcher = Matcher::new(&self.pattern, self.regex)
            .map_err(|reason| rule_error(&self.name, "pattern", reason))?;
        if self.threshold == 0 || self.threshold > 1_000_000 {
            return Err(rule_error(
                &self.name,
                "threshold",
                format!("{} must be from 1 to 1000000", self.threshold),
            ));
        }
        Ok(PatternRule {
            name: self.name,
            files,
            matcher,
            threshold: self.threshold,
            window,
            severity: self.severity.unwrap_or(Severity::Warning),
        })
    }
}

// === impl ErrorRateRuleConfig ===

impl ErrorRateRuleConfig {
    fn validate(self, i: usize) -> Result<ErrorRateRule, ConfigError> {
        let (files, window) = common("error_rates", i, &self.name, &self.files, self.window)?;
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err(rule_error(
                &self.name,
                "threshold",
                format!(
                    "{} must be above 0 and at most 1 (0.05 is 5%)",
                    self.threshold
                ),
            ));
        }
        if self.min_requests == 0 {
            return Err(rule_error(
                &self.name,
                "min_requests",
                "0 must be at least 1".into(),
            ));
        }
        if let Some(d) = self
            .direction
            .as_deref()
            .filter(|d| !matches!(*d, "inbound" | "outbound"))
        {
            return Err(rule_error(
                &self.name,
                "direction",
                format!("{d:?} must be inbound or outbound"),
            ));
        }
        Ok(ErrorRateRule {
            name: self.name,
            direction: self.direction,
            files,
            window,
            threshold: self.threshold,
            min_requests: self.min_requests,
            severity: self.severity.unwrap_or(Severity::Critical),
        })
    }
}
