//! A minimal reader of the Prometheus text format, for the few series the
//! traffic detector needs: comments and blank lines are skipped, label
//! values may hold escaped quotes, backslashes and newlines, values may be
//! `+Inf`, `-Inf` or `NaN`, and a trailing timestamp is ignored. Lines of
//! other series are skipped unread, so a series the reader does not know
//! cannot break it.

/// One sample: a series name, its labels and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The series name (`mesh_proxy_requests_total`).
    pub name: String,
    /// The labels in the order written.
    pub labels: Labels,
    /// The value.
    pub value: f64,
}

/// A line of a wanted series that is not in the text format.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("metrics line {line}: {reason}")]
pub struct ParseError {
    /// The line number, from 1.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

// === impl Sample ===

impl Sample {
    /// The value of label `name`, if it has one.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The samples of `text` whose series name `wanted` accepts.
pub fn parse(text: &str, wanted: impl Fn(&str) -> bool) -> Result<Vec<Sample>, ParseError> {
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .unwrap_or(line.len());
        let name = &line[..end];
        if !wanted(name) {
            continue;
        }
        let sample = parse_rest(name, &line[end..]).map_err(|reason| ParseError {
            line: i + 1,
            reason,
        })?;
        samples.push(sample);
    }
    Ok(samples)
}

/// The labels and value after the series name.
fn parse_rest(name: &str, rest: &str) -> Result<Sample, String> {
    let (labels, rest) = match rest.strip_prefix('{') {
        Some(inner) => parse_labels(inner)?,
        None => (Vec::new(), rest),
    };
    let value = rest
        .split_whitespace()
        .next()
        .ok_or_else(|| format!("{name} has no value"))?;
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value: parse_value(value).ok_or_else(|| format!("{name}: {value:?} is not a number"))?,
    })
}

/// A sample's labels: name and value.
pub type Labels = Vec<(String, String)>;

/// `a="x",b="y"}` and what follows the `}`.
fn parse_labels(mut s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let eq = s.find('=').ok_or("a label without `=`")?;
        let label = s[..eq].trim().to_owned();
        if label.is_empty() {
            return Err("a label without a name".into());
        }
        s = s[eq + 1..]
            .trim_start()
            .strip_prefix('"')
            .ok_or_else(|| format!("label {label}: the value is not quoted"))?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("label {label}: the value is not closed")),
                },
                Some((_, c)) => value.push(c),
                None => return Err(format!("label {label}: the value is not closed")),
            }
        };
        labels.push((label, value));
        s = &s[end + 1..];
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_labels_escapes_and_infinities_are_read() {
        let text = "# HELP mesh_proxy_requests_total Requests proxied, by service.\n\
            # TYPE mesh_proxy_requests_total counter\n\
            \n\
            mesh_proxy_requests_total{service=\"web\",code_class=\"2xx\"} 42\n\
            mesh_proxy_requests_total{service=\"we\\\"b\\\\x\\n\",code_class=\"5xx\",} 1e3 1700000000000\n\
            mesh_proxy_request_duration_seconds_bucket{service=\"web\",le=\"+Inf\"} 7\n\
            mesh_proxy_up 1\n\
            other_series{broken 3\n";
        let got = parse(text, |n| n.starts_with("mesh_proxy_")).unwrap();
        assert_eq!(got.len(), 4);
        assert_eq!(got[0].label("service"), Some("web"));
        assert_eq!(got[0].value, 42.0);
        assert_eq!(got[1].label("service"), Some("we\"b\\x\n"));
        assert_eq!(got[1].label("code_class"), Some("5xx"));
        assert_eq!(got[1].value, 1000.0);
        assert_eq!(got[2].label("le"), Some("+Inf"));
        assert_eq!(got[2].value, 7.0);
        assert!(got[3].labels.is_empty());
        assert_eq!(got[3].value, 1.0);
    }

    #[test]
    fn a_broken_wanted_line_names_its_line() {
        let text = "# ok\nmesh_proxy_requests_total{service=\"web} 1\n";
        let e = parse(text, |_| true).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.to_string().contains("not closed"), "{e}");
        let e = parse("mesh_x{a=\"b\"} many\n", |_| true).unwrap_err();
        assert!(e.to_string().contains("\"many\" is not a number"), "{e}");
        let e = parse("mesh_x\n", |_| true).unwrap_err();
        assert!(e.to_string().contains("no value"), "{e}");
    }
}
