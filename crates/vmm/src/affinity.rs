//! Host CPU placement of a VMM's threads: the `INDEX@CPUS` lists of
//! `--vcpu-affinity` and `--iothread-affinity` (as Cloud Hypervisor's
//! `--cpus affinity=[0@[0,2]]`), and pinning the calling thread.
//!
//! A thread pins itself when it starts, before its seccomp filter is
//! installed, so no allow-list needs `sched_setaffinity`.

use std::fmt;

/// The most host CPUs a `cpu_set_t` names.
pub const MAX_CPUS: usize = libc::CPU_SETSIZE as usize;

/// A set of host CPUs, sorted, each at most once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuSet(Vec<usize>);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum AffinityError {
    #[error(
        "invalid affinity {spec:?}: expected INDEX@CPUS, CPUS a list of host CPUs \
         and ranges separated by ':' (e.g. 0@2 or 1@0-3:6)"
    )]
    Syntax { spec: String },
    #[error("host CPU {cpu} in {spec:?} is out of range (at most {})", MAX_CPUS - 1)]
    CpuRange { spec: String, cpu: usize },
    #[error("{what} {index} is given an affinity twice")]
    Duplicate { what: &'static str, index: usize },
    #[error("{what} {index} is given an affinity, but there are {count} {what}s (0 to {})", count.saturating_sub(1))]
    NoSuchThread {
        what: &'static str,
        index: usize,
        count: usize,
    },
    #[error("pinning {thread} to host CPUs {cpus}")]
    Apply {
        thread: String,
        cpus: CpuSet,
        #[source]
        source: std::io::Error,
    },
}

impl CpuSet {
    /// Parses `0-3:6`: host CPUs and inclusive ranges separated by `:`.
    fn parse(list: &str, spec: &str) -> Result<CpuSet, AffinityError> {
        let syntax = || AffinityError::Syntax { spec: spec.into() };
        let num = |s: &str| -> Result<usize, AffinityError> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(syntax());
            }
            let cpu: usize = s.parse().map_err(|_| syntax())?;
            if cpu >= MAX_CPUS {
                return Err(AffinityError::CpuRange {
                    spec: spec.into(),
                    cpu,
                });
            }
            Ok(cpu)
        };
        let mut cpus = Vec::new();
        for part in list.split(':') {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (num(a)?, num(b)?);
                    if a > b {
                        return Err(syntax());
                    }
                    cpus.extend(a..=b);
                }
                None => cpus.push(num(part)?),
            }
        }
        cpus.sort_unstable();
        cpus.dedup();
        Ok(CpuSet(cpus))
    }

    pub fn cpus(&self) -> &[usize] {
        &self.0
    }

    /// Pins the calling thread (named `thread` in the error) to the set.
    pub fn apply_to_current_thread(&self, thread: &str) -> Result<(), AffinityError> {
        // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &cpu in &self.0 {
            // SAFETY: `cpu` is below CPU_SETSIZE (checked when parsed), so
            // the macro's bit index stays inside `set`.
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
        // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t
        // of the size passed.
        let rc =
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        if rc != 0 {
            return Err(AffinityError::Apply {
                thread: thread.into(),
                cpus: self.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for CpuSet {
    /// `0-3,6`, as `/proc/PID/status` prints `Cpus_allowed_list`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut i = 0;
        let mut first = true;
        while i < self.0.len() {
            let start = self.0[i];
            let mut end = start;
            while i + 1 < self.0.len() && self.0[i + 1] == end + 1 {
                i += 1;
                end = self.0[i];
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

/// Each thread's CPU set from `specs` (each `INDEX@CPUS`, or several
/// separated by commas), indexed by thread, for `count` threads of kind
/// `what` (for the messages: "vCPU", "iothread"). Threads without an
/// entry keep the process's affinity (`None`).
pub fn by_index(
    specs: &[String],
    count: usize,
    what: &'static str,
) -> Result<Vec<Option<CpuSet>>, AffinityError> {
    let mut out = vec![None; count];
    for spec in specs.iter().flat_map(|s| s.split(',')) {
        let syntax = || AffinityError::Syntax { spec: spec.into() };
        let (index, list) = spec.split_once('@').ok_or_else(syntax)?;
        if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let index: usize = index.parse().map_err(|_| syntax())?;
        let set = CpuSet::parse(list, spec)?;
        let slot = out
            .get_mut(index)
            .ok_or(AffinityError::NoSuchThread { what, index, count })?;
        if slot.is_some() {
            return Err(AffinityError::Duplicate { what, index });
        }
        *slot = Some(set);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(specs: &[&str], count: usize) -> Result<Vec<Option<String>>, String> {
        let specs: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
        by_index(&specs, count, "vCPU")
            .map(|v| v.into_iter().map(|s| s.map(|s| s.to_string())).collect())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn lists_and_ranges() {
        assert_eq!(
            parse(&["0@2", "2@0-3:6,1@5:4:5"], 4).unwrap(),
            [
                Some("2".into()),
                Some("4-5".into()),
                Some("0-3,6".into()),
                None
            ]
        );
        assert_eq!(parse(&[], 2).unwrap(), [None, None]);
        assert_eq!(parse(&["0@1023"], 1).unwrap(), [Some("1023".into())]);
    }

    #[test]
    fn bad_lists_say_what_is_wrong() {
        for bad in [
            "", "0", "@1", "0@", "x@1", "0@a", "0@1-", "0@-1", "0@3-1", "0@1::2", "0@1,", "-1@0",
            "0@ 1",
        ] {
            let e = parse(&[bad], 2).unwrap_err();
            assert!(e.contains("expected INDEX@CPUS"), "{bad:?}: {e}");
        }
        assert!(parse(&["0@1024"], 1).unwrap_err().contains("out of range"));
        assert!(parse(&["0@99999999999999999999999"], 1)
            .unwrap_err()
            .contains("expected"));
        assert_eq!(
            parse(&["0@1", "0@2"], 2).unwrap_err(),
            "vCPU 0 is given an affinity twice"
        );
        assert_eq!(
            parse(&["2@1"], 2).unwrap_err(),
            "vCPU 2 is given an affinity, but there are 2 vCPUs (0 to 1)"
        );
    }

    #[test]
    fn a_thread_pins_itself_and_an_impossible_set_is_an_error() {
        // This process's own CPUs (a CI runner may have been given a few).
        let allowed = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| {
                l.strip_prefix("Cpus_allowed_list:")
                    .map(|v| v.trim().to_string())
            })
            .unwrap();
        let first: usize = allowed.split([',', '-']).next().unwrap().parse().unwrap();
        std::thread::spawn(move || {
            let set = CpuSet::parse(&first.to_string(), "test").unwrap();
            set.apply_to_current_thread("test thread").unwrap();
            let now = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            assert!(
                now.contains(&format!("Cpus_allowed_list:\t{first}\n")),
                "{now}"
            );
            // A CPU no machine here has: the kernel refuses the set.
            let none = CpuSet::parse("1000", "test").unwrap();
            let e = none.apply_to_current_thread("test thread").unwrap_err();
            assert!(
                e.to_string()
                    .starts_with("pinning test thread to host CPUs 1000"),
                "{e}"
            );
        })
        .join()
        .unwrap();
    }
}
