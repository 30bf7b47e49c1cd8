//! Unified diffs of rendered configs (`diff -u` format, three lines of
//! context), so a version shows what it changes line by line.
//!
//! Lines are matched by a longest-common-subsequence table after the common
//! head and tail are cut off, which is exact and cheap for config files. A
//! change too large for the table (over [`MAX_CELLS`]) is shown as one hunk
//! that replaces the whole middle.

/// Lines of context around each change.
pub const CONTEXT: usize = 3;

/// Largest LCS table (changed old lines × changed new lines) computed.
pub const MAX_CELLS: usize = 4_000_000;

/// One line of an edit script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Edit {
    Same(usize, usize),
    Removed(usize),
    Added(usize),
}

/// The unified diff of `old` against `new`, headed `--- old_label` and
/// `+++ new_label`; empty when the texts have the same lines.
pub fn unified(old: &str, new: &str, old_label: &str, new_label: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let edits = edit_script(&a, &b);
    if edits.iter().all(|e| matches!(e, Edit::Same(..))) {
        return String::new();
    }
    let mut out = format!("--- {old_label}\n+++ {new_label}\n");
    for hunk in hunks(&edits) {
        write_hunk(&mut out, &edits[hunk.0..hunk.1], &a, &b);
    }
    out
}

/// The edit script turning `a` into `b`.
fn edit_script(a: &[&str], b: &[&str]) -> Vec<Edit> {
    let head = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let tail = a[head..]
        .iter()
        .rev()
        .zip(b[head..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (a_mid, b_mid) = (&a[head..a.len() - tail], &b[head..b.len() - tail]);
    let mut edits: Vec<Edit> = (0..head).map(|i| Edit::Same(i, i)).collect();
    edits.extend(middle(a_mid, b_mid, head));
    let (a_end, b_end) = (a.len() - tail, b.len() - tail);
    edits.extend((0..tail).map(|k| Edit::Same(a_end + k, b_end + k)));
    edits
}

/// The edits of the changed middle, indices offset by `at`.
fn middle(a: &[&str], b: &[&str], at: usize) -> Vec<Edit> {
    let (n, m) = (a.len(), b.len());
    if n == 0 || m == 0 || n.saturating_mul(m) > MAX_CELLS {
        let removed = (0..n).map(|i| Edit::Removed(at + i));
        return removed.chain((0..m).map(|j| Edit::Added(at + j))).collect();
    }
    // lcs[i][j]: length of the LCS of a[i..] and b[j..].
    let width = m + 1;
    let mut lcs = vec![0u32; (n + 1) * width];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i * width + j] = if a[i] == b[j] {
                lcs[(i + 1) * width + j + 1] + 1
            } else {
                lcs[(i + 1) * width + j].max(lcs[i * width + j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut edits = Vec::with_capacity(n + m);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            edits.push(Edit::Same(at + i, at + j));
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i * width + j + 1] >= lcs[(i + 1) * width + j]) {
            edits.push(Edit::Added(at + j));
            j += 1;
        } else {
            edits.push(Edit::Removed(at + i));
            i += 1;
        }
    }
    // Removals first within a run of changes, as diff -u prints them.
    order_runs(&mut edits);
    edits
}

/// Within each run of consecutive changes, puts the removals before the
/// additions (keeping each kind in order).
fn order_runs(edits: &mut [Edit]) {
    let mut start = 0;
    while start < edits.len() {
        if matches!(edits[start], Edit::Same(..)) {
            start += 1;
            continue;
        }
        let end = edits[start..]
            .iter()
            .position(|e| matches!(e, Edit::Same(..)))
            .map_or(edits.len(), |p| start + p);
        edits[start..end].sort_by_key(|e| match e {
            Edit::Removed(i) => (0, *i),
            Edit::Added(j) => (1, *j),
            Edit::Same(..) => (2, 0),
        });
        start = end;
    }
}

/// Ranges of `edits` that form hunks: each change with up to [`CONTEXT`]
/// unchanged lines around it, overlapping ranges merged.
fn hunks(edits: &[Edit]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (k, e) in edits.iter().enumerate() {
        if matches!(e, Edit::Same(..)) {
            continue;
        }
        let start = k.saturating_sub(CONTEXT);
        let end = (k + 1 + CONTEXT).min(edits.len());
        match out.last_mut() {
            Some(last) if start <= last.1 => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

fn write_hunk(out: &mut String, edits: &[Edit], a: &[&str], b: &[&str]) {
    let (mut a_start, mut b_start) = (None, None);
    let (mut a_len, mut b_len) = (0, 0);
    for e in edits {
        match *e {
            Edit::Same(i, j) => {
                a_start.get_or_insert(i);
                b_start.get_or_insert(j);
                a_len += 1;
                b_len += 1;
            }
            Edit::Removed(i) => {
                a_start.get_or_insert(i);
                a_len += 1;
            }
            Edit::Added(j) => {
                b_start.get_or_insert(j);
                b_len += 1;
            }
        }
    }
    // A side with no lines in the hunk is numbered by the line before it.
    let a_pos = a_start.map_or_else(|| before(edits, true), |s| s + 1);
    let b_pos = b_start.map_or_else(|| before(edits, false), |s| s + 1);
    out.push_str(&format!(
        "@@ -{} +{} @@\n",
        range(a_pos, a_len),
        range(b_pos, b_len)
    ));
    for e in edits {
        let (mark, line) = match *e {
            Edit::Same(i, _) => (' ', a[i]),
            Edit::Removed(i) => ('-', a[i]),
            Edit::Added(j) => ('+', b[j]),
        };
        out.push(mark);
        out.push_str(line);
        out.push('\n');
    }
}

/// The 1-based line after which an empty side of a hunk sits: the count of
/// that side's lines before the hunk.
fn before(edits: &[Edit], old_side: bool) -> usize {
    edits
        .iter()
        .find_map(|e| match *e {
            Edit::Removed(i) if old_side => Some(i),
            Edit::Added(j) if !old_side => Some(j),
            _ => None,
        })
        .unwrap_or(0)
}

fn range(start: usize, len: usize) -> String {
    if len == 1 {
        start.to_string()
    } else {
        format!("{start},{len}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_texts_have_no_diff() {
        assert_eq!(unified("a\nb\n", "a\nb\n", "x", "y"), "");
    }

    #[test]
    fn a_changed_line_has_context_around_it() {
        let old = "1\n2\n3\n4\n5\n6\n7\n8\n9\n";
        let new = "1\n2\n3\n4\nfive\n6\n7\n8\n9\n";
        assert_eq!(
            unified(old, new, "a/v1", "b/v2"),
            "--- a/v1\n+++ b/v2\n@@ -2,7 +2,7 @@\n 2\n 3\n 4\n-5\n+five\n 6\n 7\n 8\n"
        );
    }

    #[test]
    fn a_first_version_is_all_added() {
        assert_eq!(
            unified("", "x\ny\n", "a", "b"),
            "--- a\n+++ b\n@@ -0,0 +1,2 @@\n+x\n+y\n"
        );
        assert_eq!(
            unified("x\n", "", "a", "b"),
            "--- a\n+++ b\n@@ -1 +0,0 @@\n-x\n"
        );
    }

    #[test]
    fn distant_changes_make_two_hunks_and_near_ones_one() {
        let lines = |f: &dyn Fn(u32) -> String| -> String {
            (1..=20).map(|i| format!("{}\n", f(i))).collect()
        };
        let old = lines(&|i| i.to_string());
        let new = lines(&|i| match i {
            2 => "two".into(),
            18 => "eighteen".into(),
            i => i.to_string(),
        });
        let diff = unified(&old, &new, "a", "b");
        assert_eq!(diff.matches("@@ -").count(), 2, "{diff}");
        assert!(diff.contains("@@ -1,5 +1,5 @@"), "{diff}");
        assert!(diff.contains("@@ -15,6 +15,6 @@"), "{diff}");
        let near = lines(&|i| match i {
            5 => "five".into(),
            9 => "nine".into(),
            i => i.to_string(),
        });
        let diff = unified(&old, &near, "a", "b");
        assert_eq!(diff.matches("@@ -").count(), 1, "{diff}");
    }

    #[test]
    fn an_insertion_keeps_the_lines_around_it_unchanged() {
        let diff = unified("a\nb\nc\n", "a\nb\nnew\nc\n", "o", "n");
        assert_eq!(diff, "--- o\n+++ n\n@@ -1,3 +1,4 @@\n a\n b\n+new\n c\n");
    }

    #[test]
    fn applying_the_edits_gives_the_new_text() {
        let old = "x\na\nb\nc\nd\ne\ny\n";
        let new = "a\nc\nB\nd\nz\ne\n";
        let a: Vec<&str> = old.lines().collect();
        let b: Vec<&str> = new.lines().collect();
        let edits = edit_script(&a, &b);
        let rebuilt: Vec<&str> = edits
            .iter()
            .filter_map(|e| match *e {
                Edit::Same(i, _) => Some(a[i]),
                Edit::Added(j) => Some(b[j]),
                Edit::Removed(_) => None,
            })
            .collect();
        assert_eq!(rebuilt, b);
        let same = edits.iter().filter(|e| matches!(e, Edit::Same(..))).count();
        assert_eq!(same, 4, "a c d e is the longest common part");
    }
}
