//! What `/proc/<pid>/stat` tells about a process: whether it still runs, and
//! its start time, which tells a process from a later one that got the same
//! pid.

use std::{fs, io};

/// The two fields of `/proc/<pid>/stat` the supervisor needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// Field 3: `R`, `S`, `D`, `Z` (zombie), `X` (dead)…
    pub(crate) state: char,
    /// Field 22: when the process started, in clock ticks after boot.
    pub(crate) starttime: u64,
}

/// Whether a recorded process (pid and start time) still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// The same process runs.
    Alive,
    /// No such process, or a zombie (exited, not reaped yet).
    Gone,
    /// The pid belongs to another process now: never signal it.
    Reused,
}

/// Reads and parses `/proc/<pid>/stat`.
pub(crate) fn stat(pid: u32) -> io::Result<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat has no state or start time: {text:?}"),
        )
    })
}

/// Parses the text of a `stat` file. The command name (field 2) is in
/// parentheses and may itself hold spaces and parentheses, so fields are
/// counted after the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    let (_, rest) = text.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `fields` now starts at field 4; starttime is field 22.
    let starttime = fields.nth(22 - 4)?.parse().ok()?;
    Some(ProcStat { state, starttime })
}

/// Whether the process `pid` that started at `starttime` still runs.
pub(crate) fn liveness(pid: u32, starttime: u64) -> Liveness {
    match stat(pid) {
        Err(_) => Liveness::Gone,
        Ok(s) if s.starttime != starttime => Liveness::Reused,
        Ok(s) if matches!(s.state, 'Z' | 'X') => Liveness::Gone,
        Ok(_) => Liveness::Alive,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_state_and_starttime_behind_odd_command_names() {
        let text = "4242 (java (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    5 6 0 0 20 0 30 0 987654 1234567 89 18446744073709551615";
        assert_eq!(
            parse_stat(text),
            Some(ProcStat {
                state: 'S',
                starttime: 987654
            })
        );
        assert_eq!(parse_stat("12 (sh) R 1 2"), None);
    }

    #[test]
    fn own_process_is_alive_and_other_start_time_is_reused() {
        let me = std::process::id();
        let s = stat(me).unwrap();
        assert_eq!(liveness(me, s.starttime), Liveness::Alive);
        assert_eq!(liveness(me, s.starttime + 1), Liveness::Reused);
        assert_eq!(liveness(u32::MAX, 0), Liveness::Gone);
    }
}
