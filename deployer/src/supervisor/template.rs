//! A service's command template (`java -jar {artifact} --server.port={port}`)
//! turned into argv. The template is split on whitespace *before* the
//! variables are put in, so a value with spaces (a path) stays one argument
//! and no value can add arguments of its own.

use std::collections::BTreeMap;

/// Why a command template could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The template has no words at all.
    #[error("command template is empty")]
    Empty,
    /// `{name}` names no known variable.
    #[error("command template uses unknown variable {{{name}}} (known: {known})")]
    UnknownVariable {
        /// The name between the braces.
        name: String,
        /// The variables that exist, comma-separated.
        known: String,
    },
    /// A `{` without its `}`.
    #[error("command template has an unclosed '{{' in {word:?} (write '{{{{' for a literal one)")]
    Unclosed {
        /// The word of the template holding it.
        word: String,
    },
    /// A `}` that closes nothing.
    #[error("command template has a stray '}}' in {word:?} (write '}}}}' for a literal one)")]
    StrayClose {
        /// The word of the template holding it.
        word: String,
    },
}

/// Expands `template` into argv: words split on whitespace, then every
/// `{name}` in a word replaced by `vars[name]`. `{{` and `}}` stand for
/// literal braces.
pub fn expand(
    template: &str,
    vars: &BTreeMap<String, String>,
) -> Result<Vec<String>, TemplateError> {
    let argv = template
        .split_whitespace()
        .map(|word| expand_word(word, vars))
        .collect::<Result<Vec<_>, _>>()?;
    if argv.is_empty() {
        return Err(TemplateError::Empty);
    }
    Ok(argv)
}

fn expand_word(word: &str, vars: &BTreeMap<String, String>) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(word.len());
    let mut rest = word;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("{{") {
            out.push('{');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("}}") {
            out.push('}');
            rest = after;
        } else if tail.starts_with('}') {
            return Err(TemplateError::StrayClose {
                word: word.to_owned(),
            });
        } else {
            let end = tail.find('}').ok_or_else(|| TemplateError::Unclosed {
                word: word.to_owned(),
            })?;
            let name = &tail[1..end];
            let value = vars
                .get(name)
                .ok_or_else(|| TemplateError::UnknownVariable {
                    name: name.to_owned(),
                    known: vars
                        .keys()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            out.push_str(value);
            rest = &tail[end + 1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn value_with_spaces_stays_one_argument() {
        let v = vars(&[("artifact", "/srv/my app/app.jar"), ("port", "8080")]);
        let argv = expand("java  -jar {artifact}\t--server.port={port}", &v).unwrap();
        assert_eq!(
            argv,
            ["java", "-jar", "/srv/my app/app.jar", "--server.port=8080"]
        );
    }

    #[test]
    fn unknown_variable_is_named() {
        let v = vars(&[("port", "1")]);
        let err = expand("java -jar {artfact}", &v).unwrap_err();
        assert_eq!(
            err,
            TemplateError::UnknownVariable {
                name: "artfact".into(),
                known: "port".into()
            }
        );
        assert!(err.to_string().contains("{artfact}"), "{err}");
    }

    #[test]
    fn braces_escape_and_malformed_templates_fail() {
        let v = vars(&[("a", "x")]);
        assert_eq!(expand("-D{{k}}={a}", &v).unwrap(), ["-D{k}=x"]);
        assert!(matches!(
            expand("{a", &v),
            Err(TemplateError::Unclosed { .. })
        ));
        assert!(matches!(
            expand("a}", &v),
            Err(TemplateError::StrayClose { .. })
        ));
        assert_eq!(expand("  ", &v), Err(TemplateError::Empty));
    }
}
