//! Signals by name, as operators write them: `HUP`, `SIGHUP`, `hup`.

use std::fmt;
use std::io;
use std::str::FromStr;

/// A Unix signal number that has a name here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signal(pub i32);

const NAMES: [(&str, i32); 10] = [
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
    ("TERM", libc::SIGTERM),
    ("CONT", libc::SIGCONT),
    ("WINCH", libc::SIGWINCH),
    ("ALRM", libc::SIGALRM),
];

impl Signal {
    pub const HUP: Signal = Signal(libc::SIGHUP);
    pub const INT: Signal = Signal(libc::SIGINT);
    pub const QUIT: Signal = Signal(libc::SIGQUIT);
    pub const TERM: Signal = Signal(libc::SIGTERM);
    pub const USR1: Signal = Signal(libc::SIGUSR1);
    pub const USR2: Signal = Signal(libc::SIGUSR2);
    pub const WINCH: Signal = Signal(libc::SIGWINCH);

    /// kill(2).
    pub fn send(self, pid: i32) -> io::Result<()> {
        crate::sys::kill(pid, self.0)
    }
}

/// A signal name this module does not know.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a signal name; use one of {}", NAMES.map(|(n, _)| n).join(", "))]
pub struct UnknownSignal {
    /// What was written, as written.
    pub text: String,
}

impl FromStr for Signal {
    type Err = UnknownSignal;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let upper = text.trim().to_ascii_uppercase();
        let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
        NAMES
            .iter()
            .find(|(name, _)| *name == bare)
            .map(|(_, n)| Signal(*n))
            .ok_or_else(|| UnknownSignal {
                text: text.to_owned(),
            })
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match NAMES.iter().find(|(_, n)| *n == self.0) {
            Some((name, _)) => write!(f, "SIG{name}"),
            None => write!(f, "signal {}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_with_or_without_sig() {
        assert_eq!("HUP".parse::<Signal>().unwrap(), Signal::HUP);
        assert_eq!("sigusr1".parse::<Signal>().unwrap(), Signal::USR1);
        assert_eq!(Signal::TERM.to_string(), "SIGTERM");
        assert!(
            "BOGUS"
                .parse::<Signal>()
                .unwrap_err()
                .to_string()
                .contains("HUP")
        );
    }
}
