//! CPU time spent by processes, read from `/proc` (Linux): for the
//! benchmark's CPU per event of each process of the pipeline.

use std::collections::HashMap;
use std::sync::OnceLock;

/// Clock ticks per second of `/proc/PID/stat` (`getconf CLK_TCK`; 100,
/// the value on every Linux this runs on, if it cannot be asked).
pub fn ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The fields of `/proc/PID/stat` this module reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    pub(crate) ppid: u32,
    /// utime + stime: ticks the process itself ran.
    pub(crate) own: u64,
    /// cutime + cstime: ticks of its children that ended and were waited for.
    pub(crate) reaped: u64,
    pub(crate) start_time: u64,
}

/// Parses the text of `/proc/PID/stat`.
pub(crate) fn parse_stat(text: &str) -> Option<Stat> {
    // The command name (field 2) may hold spaces: count from after its ')'.
    let rest = text.get(text.rfind(')')? + 2..)?;
    let field = |n: usize| -> Option<u64> { rest.split_whitespace().nth(n)?.parse().ok() };
    // `rest` starts at field 3 (the state).
    Some(Stat {
        ppid: u32::try_from(field(1)?).ok()?,
        own: field(11)? + field(12)?,
        reaped: field(13)? + field(14)?,
        start_time: field(19)?,
    })
}

pub(crate) fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Seconds of CPU the benchmark's own process spent so far (every thread).
pub fn own_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|text| parse_stat(&text))
        .map_or(f64::NAN, |s| s.own as f64 / ticks_per_second())
}

/// Seconds of CPU spent by `root` and every process below it, including
/// those that already ended (a server's exited workers count through their
/// parent's reaped time). NaN when `root` is not running.
pub fn tree_seconds(root: u32) -> f64 {
    let Some(root_stat) = stat(root) else {
        return f64::NAN;
    };
    let mut children: HashMap<u32, Vec<(u32, Stat)>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(s) = stat(pid) {
                children.entry(s.ppid).or_default().push((pid, s));
            }
        }
    }
    let mut ticks = 0u64;
    let mut todo = vec![(root, root_stat)];
    while let Some((pid, s)) = todo.pop() {
        ticks += s.own + s.reaped;
        if let Some(below) = children.get(&pid) {
            todo.extend(below.iter().copied());
        }
    }
    ticks as f64 / ticks_per_second()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_a_command_with_spaces() {
        let line = "42 (a b) c) S 7 42 42 0 -1 4194560 100 0 0 0 30 12 5 3 20 0 1 0 9876 1000 10";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                ppid: 7,
                own: 42,
                reaped: 8,
                start_time: 9876
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    /// Invariant: a process tree's CPU counts its own and its children's,
    /// including children that already ended.
    #[test]
    fn a_tree_counts_what_ended_children_spent() {
        let before = tree_seconds(std::process::id());
        // A child that burns CPU and ends (waited for: reaped time).
        let status = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .status();
        assert!(status.is_ok_and(|s| s.success()));
        let after = tree_seconds(std::process::id());
        println!("tree cpu before={before:.2}s after={after:.2}s");
        assert!(after > before, "the ended child's CPU is counted");
        assert!(own_seconds().is_finite());
        assert!(tree_seconds(u32::MAX).is_nan());
    }
}
