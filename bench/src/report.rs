//! The run's figures. Each one is a value with its ratio against the
//! baselines measured in the same run and, where issue 3 sets one, the bar
//! it must meet. A figure is printed the moment it is known, as
//! `name: value unit (ratio x baseline value, …) [bar: rule, met]`, and the
//! whole report is written as JSON at the end.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, Result};
use serde::Serialize;

/// One measured figure.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    /// Dotted name, e.g. `dataplane.c16.requests_per_s`.
    pub name: String,
    /// The value.
    pub value: f64,
    /// Its unit.
    pub unit: String,
    /// Its ratio against each baseline.
    pub versus: Vec<Versus>,
    /// The bar it must meet, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bar: Option<Bar>,
}

/// A figure's ratio against one baseline.
#[derive(Clone, Debug, Serialize)]
pub struct Versus {
    /// What the baseline is (`nginx`, `direct`, `consul`).
    pub baseline: String,
    /// The baseline's value, same unit.
    pub value: f64,
    /// figure ÷ baseline.
    pub ratio: f64,
}

/// A bar from issue 3 and whether the figure meets it.
#[derive(Clone, Debug, Serialize)]
pub struct Bar {
    /// The rule, e.g. `>= 1.2x nginx`.
    pub rule: String,
    /// Whether it holds.
    pub met: bool,
}

/// Everything a run found.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// The machine and tools.
    pub machine: BTreeMap<String, String>,
    /// The settings of the run.
    pub settings: BTreeMap<String, serde_json::Value>,
    /// Figures in the order measured.
    pub figures: Vec<Figure>,
    /// Raw numbers behind the figures, by phase.
    pub details: BTreeMap<String, serde_json::Value>,
    /// What a reader must know to read the figures right.
    pub notes: Vec<String>,
    /// Wall-clock time of the measuring, seconds.
    pub elapsed_s: f64,
}

// === impl Figure ===

impl Figure {
    /// A figure without baselines yet.
    pub fn new(name: impl Into<String>, value: f64, unit: &str) -> Self {
        Self {
            name: name.into(),
            value,
            unit: unit.to_owned(),
            versus: Vec::new(),
            bar: None,
        }
    }

    /// Adds a baseline; the ratio is value ÷ baseline.
    pub fn vs(mut self, baseline: &str, value: f64) -> Self {
        self.versus.push(Versus {
            baseline: baseline.to_owned(),
            value,
            ratio: self.value / value,
        });
        self
    }

    /// Sets the bar.
    pub fn bar(mut self, rule: &str, met: bool) -> Self {
        self.bar = Some(Bar {
            rule: rule.to_owned(),
            met,
        });
        self
    }

    /// The ratio against `baseline`.
    pub fn ratio(&self, baseline: &str) -> Option<f64> {
        self.versus
            .iter()
            .find(|v| v.baseline == baseline)
            .map(|v| v.ratio)
    }

    /// The printed line.
    pub fn line(&self) -> String {
        let mut line = format!("{}: {} {}", self.name, num(self.value), self.unit);
        if !self.versus.is_empty() {
            let vs: Vec<String> = self
                .versus
                .iter()
                .map(|v| format!("{:.2}x {} {}", v.ratio, v.baseline, num(v.value)))
                .collect();
            line.push_str(&format!(" ({})", vs.join(", ")));
        }
        if let Some(bar) = &self.bar {
            let verdict = if bar.met { "met" } else { "NOT MET" };
            line.push_str(&format!(" [bar {}: {verdict}]", bar.rule));
        }
        line
    }
}

/// A number with as many decimals as its size deserves.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        format!("{v}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

// === impl Report ===

impl Report {
    /// Records and prints a figure.
    pub fn add(&mut self, figure: Figure) {
        println!("{}", figure.line());
        self.figures.push(figure);
    }

    /// Records and prints a note.
    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        println!("note: {note}");
        self.notes.push(note);
    }

    /// Keeps a phase's raw numbers.
    pub fn detail(&mut self, key: &str, value: impl Serialize) {
        let value = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
        self.details.insert(key.to_owned(), value);
    }

    /// The figures with a bar: (met, total).
    pub fn bars(&self) -> (usize, usize) {
        let bars: Vec<&Bar> = self.figures.iter().filter_map(|f| f.bar.as_ref()).collect();
        (bars.iter().filter(|b| b.met).count(), bars.len())
    }

    /// Writes the report as pretty JSON to `path` (its folder is created).
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut json = serde_json::to_string_pretty(self)?;
        json.push('\n');
        std::fs::write(path, json).with_context(|| format!("write {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_shows_value_ratios_and_bar() {
        let f = Figure::new("dataplane.c16.requests_per_s", 42_000.4, "req/s")
            .vs("nginx", 35_000.0)
            .bar(">= 1.2x nginx", true);
        assert_eq!(
            f.line(),
            "dataplane.c16.requests_per_s: 42000 req/s (1.20x nginx 35000) [bar >= 1.2x nginx: met]"
        );
        assert_eq!(f.ratio("nginx"), Some(42_000.4 / 35_000.0));
    }
}
