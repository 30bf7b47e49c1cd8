//! File globs: `/var/log/svc/*/app.log`, `/var/log/orders-*.log`.
//!
//! `*` matches any run of characters within one path component, `?` one
//! character; everything else is literal. A component that starts with a
//! wildcard does not match hidden names (`.x`). Expansion reads only the
//! directories that the wildcards need.

use std::{
    fs, io,
    path::{Component, Path, PathBuf},
};

/// A parsed file glob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    source: String,
    /// The components, `/` and `..` included as they are.
    parts: Vec<Part>,
}

/// Why a glob is not accepted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    /// Nothing given.
    #[error("empty file glob")]
    Empty,
    /// `**`, which is not supported.
    #[error("file glob {0:?}: `**` is not supported; use one `*` per directory level")]
    DoubleStar(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    /// A component without wildcards, or the root.
    Literal(PathBuf),
    /// A component with `*` or `?`.
    Pattern(String),
}

// === impl Glob ===

impl Glob {
    /// Parses `source`.
    pub fn new(source: &str) -> Result<Self, GlobError> {
        if source.is_empty() {
            return Err(GlobError::Empty);
        }
        if source.contains("**") {
            return Err(GlobError::DoubleStar(source.to_owned()));
        }
        let parts = Path::new(source)
            .components()
            .map(|c| match c {
                Component::Normal(name) => {
                    let name = name.to_string_lossy();
                    if name.contains(['*', '?']) {
                        Part::Pattern(name.into_owned())
                    } else {
                        Part::Literal(PathBuf::from(&*name))
                    }
                }
                other => Part::Literal(PathBuf::from(other.as_os_str())),
            })
            .collect();
        Ok(Self {
            source: source.to_owned(),
            parts,
        })
    }

    /// The glob as given.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether it has no wildcard: it names one path, which is tailed
    /// (and waited for) whether or not it exists.
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Literal(_)))
    }

    /// Whether `path` matches, component by component.
    pub fn matches(&self, path: &Path) -> bool {
        let mut components = path.components();
        for part in &self.parts {
            let Some(c) = components.next() else {
                return false;
            };
            let ok = match part {
                Part::Literal(lit) => lit.as_os_str() == c.as_os_str(),
                Part::Pattern(pat) => match c {
                    Component::Normal(name) => name_matches(pat, &name.to_string_lossy()),
                    _ => false,
                },
            };
            if !ok {
                return false;
            }
        }
        components.next().is_none()
    }

    /// The regular files that match now, sorted. A directory that cannot
    /// be read is skipped: its files are not there for us.
    pub fn expand(&self) -> Vec<PathBuf> {
        let mut found = vec![PathBuf::new()];
        for part in &self.parts {
            found = match part {
                Part::Literal(lit) => found.into_iter().map(|p| p.join(lit)).collect(),
                Part::Pattern(pat) => found
                    .iter()
                    .flat_map(|dir| matching_entries(dir, pat).unwrap_or_default())
                    .collect(),
            };
        }
        found.retain(|p| p.is_file());
        found.sort();
        found.dedup();
        found
    }
}

/// The entries of `dir` whose names match `pattern`.
fn matching_entries(dir: &Path, pattern: &str) -> io::Result<Vec<PathBuf>> {
    let read = if dir.as_os_str().is_empty() {
        fs::read_dir(".")?
    } else {
        fs::read_dir(dir)?
    };
    let mut out = Vec::new();
    for entry in read {
        let name = entry?.file_name();
        if name_matches(pattern, &name.to_string_lossy()) {
            out.push(dir.join(name));
        }
    }
    Ok(out)
}

/// Whether a file name matches a one-component pattern.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    if name.starts_with('.') && !pattern.starts_with('.') {
        return false;
    }
    wildcard(
        &pattern.chars().collect::<Vec<_>>(),
        &name.chars().collect::<Vec<_>>(),
    )
}

/// `*` and `?` matching, iterative with one backtrack point (linear for
/// the patterns of file names).
fn wildcard(pattern: &[char], text: &[char]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == '?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}
