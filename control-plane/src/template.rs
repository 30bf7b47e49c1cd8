//! A small template language for operator-editable config files (the
//! nginx.conf of OpenResty nodes), rendered from a JSON value:
//!
//! - `{{ name }}`, `{{ service.name }}`: a value (string, number or bool);
//! - `{% for s in services %}…{% endfor %}`: once per element of a list;
//! - `{% if x %}…{% else %}…{% endif %}`, `{% if not x %}`: `false`, `null`,
//!   `0`, `""` and `[]` are false;
//! - `{# comment #}`: dropped.
//!
//! A line holding only a `{% %}` tag or a comment leaves no line behind, so
//! a template reads like the file it makes. Mistakes are caught when the
//! template is parsed (unbalanced blocks) or rendered (an unknown name),
//! with the line they are on; nothing is printed for a missing value.

use std::fmt;

use serde_json::Value;

/// A parsed template.
#[derive(Clone, Debug)]
pub struct Template {
    nodes: Vec<Node>,
}

/// A mistake in a template, with the line it is on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct TemplateError {
    /// 1-based line of the template.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

#[derive(Clone, Debug)]
enum Node {
    Text(String),
    Value {
        path: Vec<String>,
        line: usize,
    },
    For {
        var: String,
        path: Vec<String>,
        body: Vec<Node>,
        line: usize,
    },
    If {
        path: Vec<String>,
        negate: bool,
        then: Vec<Node>,
        otherwise: Vec<Node>,
        line: usize,
    },
}

/// A block-ending tag (`else`, `endfor`, `endif`) and its line.
type BlockEnd = (String, usize);

/// A token of the template source.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Text(String),
    Value(String, usize),
    Tag(String, usize),
    Comment,
}

// === impl Template ===

impl Template {
    /// Parses `source`.
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        let tokens = trim_standalone(tokenize(source)?);
        let mut tokens = tokens.into_iter();
        let (nodes, end) = parse_block(&mut tokens)?;
        if let Some((tag, line)) = end {
            return Err(err(line, format!("{{% {tag} %}} without a block to end")));
        }
        Ok(Self { nodes })
    }

    /// Renders with the names of `context` (a JSON object).
    pub fn render(&self, context: &Value) -> Result<String, TemplateError> {
        let mut out = String::new();
        let mut scope = Scope {
            root: context,
            locals: Vec::new(),
        };
        render_nodes(&self.nodes, &mut scope, &mut out)?;
        Ok(out)
    }
}

fn err(line: usize, message: impl Into<String>) -> TemplateError {
    TemplateError {
        line,
        message: message.into(),
    }
}

// === lexing ===

fn tokenize(source: &str) -> Result<Vec<Token>, TemplateError> {
    let mut tokens = Vec::new();
    let mut rest = source;
    let mut line = 1;
    while let Some(start) = rest.find('{') {
        let open = &rest[start..];
        let close = if open.starts_with("{{") {
            "}}"
        } else if open.starts_with("{%") {
            "%}"
        } else if open.starts_with("{#") {
            "#}"
        } else {
            // A lone brace is text (nginx blocks are full of them).
            let (text, after) = rest.split_at(start + 1);
            push_text(&mut tokens, text);
            line += text.matches('\n').count();
            rest = after;
            continue;
        };
        let text = &rest[..start];
        push_text(&mut tokens, text);
        line += text.matches('\n').count();
        let Some(end) = open[2..].find(close) else {
            return Err(err(
                line,
                format!("{} is never closed with {close}", &open[..2]),
            ));
        };
        let inner = &open[2..2 + end];
        match &open[..2] {
            "{{" => tokens.push(Token::Value(inner.trim().to_owned(), line)),
            "{%" => tokens.push(Token::Tag(inner.trim().to_owned(), line)),
            _ => tokens.push(Token::Comment),
        }
        line += inner.matches('\n').count();
        rest = &open[2 + end + 2..];
    }
    push_text(&mut tokens, rest);
    Ok(tokens)
}

fn push_text(tokens: &mut Vec<Token>, text: &str) {
    if text.is_empty() {
        return;
    }
    if let Some(Token::Text(last)) = tokens.last_mut() {
        last.push_str(text);
    } else {
        tokens.push(Token::Text(text.to_owned()));
    }
}

/// Drops the line of every tag or comment that stands alone on it: the
/// indentation before it and the line end after it.
fn trim_standalone(mut tokens: Vec<Token>) -> Vec<Token> {
    // Decided on the source as written, before any line is dropped.
    let standalone: Vec<bool> = (0..tokens.len())
        .map(|k| is_standalone(&tokens, k))
        .collect();
    for (k, alone) in standalone.into_iter().enumerate() {
        if !alone {
            continue;
        }
        if let Some(Token::Text(t)) = k.checked_sub(1).map(|p| &mut tokens[p]) {
            let keep = t.rfind('\n').map_or(0, |i| i + 1);
            t.truncate(keep);
        }
        if let Some(Token::Text(t)) = tokens.get_mut(k + 1) {
            let cut = t.find('\n').map_or(t.len(), |i| i + 1);
            t.drain(..cut);
        }
    }
    tokens
}

/// Whether token `k` is a tag or comment with only blanks around it on its line.
fn is_standalone(tokens: &[Token], k: usize) -> bool {
    if !matches!(tokens[k], Token::Tag(..) | Token::Comment) {
        return false;
    }
    let blank = |s: &str| s.chars().all(|c| c == ' ' || c == '\t' || c == '\r');
    let before_ok = match k.checked_sub(1).map(|p| &tokens[p]) {
        None => true,
        // Blanks since the line's start (or the file's).
        Some(Token::Text(t)) => match t.rfind('\n') {
            Some(i) => blank(&t[i + 1..]),
            None => k == 1 && blank(t),
        },
        Some(_) => false,
    };
    let after_ok = match tokens.get(k + 1) {
        None => true,
        Some(Token::Text(t)) => blank(&t[..t.find('\n').unwrap_or(t.len())]),
        Some(_) => false,
    };
    before_ok && after_ok
}

// === parsing ===

/// Parses nodes until the end or a block-ending tag (`else`, `endfor`,
/// `endif`), which is returned with its line.
fn parse_block(
    tokens: &mut std::vec::IntoIter<Token>,
) -> Result<(Vec<Node>, Option<BlockEnd>), TemplateError> {
    let mut nodes = Vec::new();
    while let Some(token) = tokens.next() {
        match token {
            Token::Text(t) if !t.is_empty() => nodes.push(Node::Text(t)),
            Token::Text(_) | Token::Comment => {}
            Token::Value(expr, line) => {
                nodes.push(Node::Value {
                    path: parse_path(&expr, line)?,
                    line,
                });
            }
            Token::Tag(tag, line) => {
                let words: Vec<&str> = tag.split_whitespace().collect();
                match words.as_slice() {
                    ["for", var, "in", list] => {
                        let (body, end) = parse_block(tokens)?;
                        expect_end(end, "endfor", "for", line)?;
                        nodes.push(Node::For {
                            var: parse_name(var, line)?,
                            path: parse_path(list, line)?,
                            body,
                            line,
                        });
                    }
                    ["if", rest @ ..] if !rest.is_empty() => {
                        nodes.push(parse_if(tokens, rest, line)?);
                    }
                    ["else" | "endfor" | "endif"] => return Ok((nodes, Some((tag, line)))),
                    _ => return Err(err(line, format!("unknown tag {{% {tag} %}}"))),
                }
            }
        }
    }
    Ok((nodes, None))
}

fn parse_if(
    tokens: &mut std::vec::IntoIter<Token>,
    cond: &[&str],
    line: usize,
) -> Result<Node, TemplateError> {
    let (negate, expr) = match cond {
        ["not", expr] => (true, *expr),
        [expr] => (false, *expr),
        _ => {
            return Err(err(
                line,
                format!(
                    "{{% if {} %}}: expected one name, or `not` and a name",
                    cond.join(" ")
                ),
            ));
        }
    };
    let (then, end) = parse_block(tokens)?;
    let otherwise = match end {
        Some((tag, _)) if tag == "else" => {
            let (otherwise, end) = parse_block(tokens)?;
            expect_end(end, "endif", "if", line)?;
            otherwise
        }
        end => {
            expect_end(end, "endif", "if", line)?;
            Vec::new()
        }
    };
    Ok(Node::If {
        path: parse_path(expr, line)?,
        negate,
        then,
        otherwise,
        line,
    })
}

fn expect_end(
    end: Option<BlockEnd>,
    want: &str,
    opened: &str,
    line: usize,
) -> Result<(), TemplateError> {
    match end {
        Some((tag, _)) if tag == want => Ok(()),
        Some((tag, at)) => Err(err(
            at,
            format!(
                "{{% {tag} %}} where {{% {want} %}} (for the {{% {opened} %}} of line {line}) was expected"
            ),
        )),
        None => Err(err(
            line,
            format!("{{% {opened} %}} is never ended with {{% {want} %}}"),
        )),
    }
}

fn parse_path(expr: &str, line: usize) -> Result<Vec<String>, TemplateError> {
    expr.split('.').map(|part| parse_name(part, line)).collect()
}

fn parse_name(name: &str, line: usize) -> Result<String, TemplateError> {
    let ok = !name.is_empty()
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(name.to_owned())
    } else {
        Err(err(line, format!("{name:?} is not a name")))
    }
}

// === rendering ===

/// The names in scope: loop variables over the root context.
struct Scope<'a> {
    root: &'a Value,
    locals: Vec<(String, &'a Value)>,
}

impl<'a> Scope<'a> {
    fn lookup(&self, path: &[String], line: usize) -> Result<&'a Value, TemplateError> {
        let (first, rest) = path
            .split_first()
            .ok_or_else(|| err(line, "an empty name"))?;
        let mut value = self
            .locals
            .iter()
            .rev()
            .find(|(name, _)| name == first)
            .map(|(_, v)| *v)
            .or_else(|| self.root.get(first))
            .ok_or_else(|| err(line, format!("unknown name {first:?}")))?;
        for (k, part) in rest.iter().enumerate() {
            value = value
                .get(part)
                .ok_or_else(|| err(line, format!("{} has no {part:?}", path[..=k].join("."))))?;
        }
        Ok(value)
    }
}

fn render_nodes<'a>(
    nodes: &'a [Node],
    scope: &mut Scope<'a>,
    out: &mut String,
) -> Result<(), TemplateError> {
    for node in nodes {
        match node {
            Node::Text(t) => out.push_str(t),
            Node::Value { path, line } => {
                let value = scope.lookup(path, *line)?;
                write_value(out, value, path, *line)?;
            }
            Node::For {
                var,
                path,
                body,
                line,
            } => {
                let list = scope.lookup(path, *line)?;
                let Some(items) = list.as_array() else {
                    return Err(err(*line, format!("{} is not a list", path.join("."))));
                };
                for item in items {
                    scope.locals.push((var.clone(), item));
                    let result = render_nodes(body, scope, out);
                    scope.locals.pop();
                    result?;
                }
            }
            Node::If {
                path,
                negate,
                then,
                otherwise,
                line,
            } => {
                let value = scope.lookup(path, *line)?;
                let branch = if truthy(value) != *negate {
                    then
                } else {
                    otherwise
                };
                render_nodes(branch, scope, out)?;
            }
        }
    }
    Ok(())
}

fn write_value(
    out: &mut String,
    value: &Value,
    path: &[String],
    line: usize,
) -> Result<(), TemplateError> {
    use fmt::Write as _;
    match value {
        Value::String(s) => out.push_str(s),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::Bool(b) => {
            let _ = write!(out, "{b}");
        }
        Value::Null => {}
        Value::Array(_) | Value::Object(_) => {
            return Err(err(
                line,
                format!("{} is a list or table, not a value", path.join(".")),
            ));
        }
    }
    Ok(())
}

fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn render(source: &str, context: Value) -> Result<String, TemplateError> {
        Template::parse(source)?.render(&context)
    }

    #[test]
    fn values_loops_and_conditions() {
        let source = "http {\n{% for s in services %}\n    upstream {{ s.name }} {\n{% if s.least %}\n        least_conn;\n{% else %}\n        # default\n{% endif %}\n    }\n{% endfor %}\n}\n";
        let out = render(
            source,
            json!({"services": [{"name": "a", "least": true}, {"name": "b", "least": false}]}),
        )
        .unwrap();
        assert_eq!(
            out,
            "http {\n    upstream a {\n        least_conn;\n    }\n    upstream b {\n        # default\n    }\n}\n"
        );
    }

    #[test]
    fn inline_tags_keep_their_line() {
        let out = render(
            "server {{ a }}:{{ p }}{% if w %} weight={{ w }}{% endif %};\n",
            json!({"a": "10.0.0.1", "p": 80, "w": 3}),
        )
        .unwrap();
        assert_eq!(out, "server 10.0.0.1:80 weight=3;\n");
        let out = render("{% if not x %}none{% endif %}\n", json!({"x": []})).unwrap();
        assert_eq!(out, "none\n");
    }

    #[test]
    fn comments_and_lone_braces() {
        let out = render("{# about #}\nevents { }\n", json!({})).unwrap();
        assert_eq!(out, "events { }\n");
    }

    #[test]
    fn mistakes_name_their_line() {
        let e = Template::parse("a\n{% for s in xs %}\nb\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e.message.contains("endfor"), "{e}");
        let e = Template::parse("a\n\n{% endif %}\n").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        let e = Template::parse("{% while x %}").unwrap_err();
        assert!(e.message.contains("unknown tag"), "{e}");
        let e = Template::parse("x {{ oops").unwrap_err();
        assert!(e.message.contains("never closed"), "{e}");
        let e = render("\n\n{{ s.nme }}", json!({"s": {"name": "a"}})).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.message.contains("nme"), "{e}");
        let e = render("{{ missing }}", json!({})).unwrap_err();
        assert!(e.message.contains("missing"), "{e}");
        let e = render("{% for x in s %}{% endfor %}", json!({"s": "text"})).unwrap_err();
        assert!(e.message.contains("not a list"), "{e}");
    }
}
