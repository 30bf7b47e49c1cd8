//! Human durations for config values: `250ms`, `2s`, `1m`, `1h`, or a plain
//! number of seconds. Serialized back in the same form.

use std::{fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A [`Duration`] that parses from and prints to `250ms`, `2s`, `1m`, `1h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

/// Why a duration did not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid duration {0:?}: expected a number with a unit, such as 250ms, 2s, 1m or 1h")]
pub struct ParseDurationError(String);

// === impl HumanDuration ===

impl HumanDuration {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl From<Duration> for HumanDuration {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl FromStr for HumanDuration {
    type Err = ParseDurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let err = || ParseDurationError(s.to_owned());
        let value: f64 = num.parse().map_err(|_| err())?;
        let secs = match unit.trim() {
            "" | "s" => value,
            "ms" => value / 1e3,
            "us" | "µs" => value / 1e6,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            _ => return Err(err()),
        };
        if !secs.is_finite() || secs < 0.0 {
            return Err(err());
        }
        Ok(Self(Duration::from_secs_f64(secs)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_refuses_garbage() {
        let p = |s: &str| s.parse::<HumanDuration>().map(|d| d.0);
        assert_eq!(p("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(p("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(p("3").unwrap(), Duration::from_secs(3));
        assert_eq!(p("1m").unwrap(), Duration::from_secs(60));
        assert!(p("fast").is_err());
        assert!(p("2 weeks").is_err());
        assert!(p("").is_err());
    }

    #[test]
    fn prints_what_it_parses() {
        for s in ["250ms", "2s", "60s"] {
            assert_eq!(s.parse::<HumanDuration>().unwrap().to_string(), s);
        }
    }
}
