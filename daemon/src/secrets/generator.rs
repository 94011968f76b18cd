//! New secret values: a `PasswordPolicy` says how long a password is and which character
//! classes it draws from, and `generate` makes one from the operating system's random source
//! using only characters that survive every target's quoting untouched.

use rand::TryRngCore;
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};

use crate::secrets::SecretValue;

/// The symbols a password may contain. Left out on purpose, because some target or
/// transport treats them specially: quotes and backslash (SQL literals, shells), `` ` `` and
/// `$` (shell expansion), `%` (URL escapes, printf), `@ : / ? # & = +` (connection URLs and
/// query strings), and whitespace and control characters (config files, copy-and-paste).
pub const SAFE_SYMBOLS: &str = "!*-_.,;^~()[]{}<>|";

const LOWERCASE: &str = "abcdefghijklmnopqrstuvwxyz";
const UPPERCASE: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const DIGITS: &str = "0123456789";

/// Shortest password a policy may ask for: 12 characters from the smallest useful alphabet
/// still give more than 60 bits.
pub const MIN_LENGTH: usize = 12;
/// Longest: every target we know accepts 256 characters.
pub const MAX_LENGTH: usize = 256;

/// How a password is made. Every enabled class contributes at least one character; characters
/// in `exclude` are never used (handy for look-alikes such as `l1O0`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PasswordPolicy {
    /// Number of characters, 12 to 256. Default 32.
    pub length: usize,
    /// Use `a-z`. Default true.
    pub lowercase: bool,
    /// Use `A-Z`. Default true.
    pub uppercase: bool,
    /// Use `0-9`. Default true.
    pub digits: bool,
    /// Use the symbols in [`SAFE_SYMBOLS`]. Default true.
    pub symbols: bool,
    /// Characters never to use. Default empty.
    pub exclude: String,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    #[error("password length {0} is out of range: use {MIN_LENGTH} to {MAX_LENGTH}")]
    LengthOutOfRange(usize),
    #[error(
        "the password policy enables no character class: enable at least one of lowercase, uppercase, digits, symbols"
    )]
    NoClass,
    #[error(
        "`exclude` removes every {0} character, yet {0} is enabled: disable it or exclude fewer"
    )]
    EmptyClass(&'static str),
    #[error(
        "length {length} is too short for {classes} enabled character classes, each of which must appear"
    )]
    TooShortForClasses { length: usize, classes: usize },
    #[error("the operating system's random source failed: {0}")]
    Entropy(String),
}

impl Default for PasswordPolicy {
    fn default() -> Self {
        Self {
            length: 32,
            lowercase: true,
            uppercase: true,
            digits: true,
            symbols: true,
            exclude: String::new(),
        }
    }
}

impl PasswordPolicy {
    /// Checks that the policy can produce a password, without producing one.
    pub fn validate(&self) -> Result<(), PolicyError> {
        self.classes().map(|_| ())
    }

    /// A fresh password: each character drawn uniformly from the union of the enabled classes,
    /// then one position per class forced to that class (so every class appears), positions
    /// chosen at random.
    pub fn generate(&self) -> Result<SecretValue, PolicyError> {
        let classes = self.classes()?;
        let alphabet: Vec<char> = classes.iter().flatten().copied().collect();
        let mut rng = OsRng;

        let mut password = Vec::with_capacity(self.length);
        for _ in 0..self.length {
            password.push(alphabet[uniform_below(&mut rng, alphabet.len())?]);
        }
        // Choosing distinct positions by a partial Fisher-Yates shuffle keeps the forced
        // characters from landing at predictable places (e.g. always the first few).
        let mut positions: Vec<usize> = (0..self.length).collect();
        for (i, class) in classes.iter().enumerate() {
            let pick = i + uniform_below(&mut rng, self.length - i)?;
            positions.swap(i, pick);
            password[positions[i]] = class[uniform_below(&mut rng, class.len())?];
        }
        let value: String = password.iter().collect();
        // The buffers held the password too; clear them before they are freed.
        zeroize::Zeroize::zeroize(&mut password);
        Ok(SecretValue::new(value))
    }

    /// The enabled classes less the excluded characters, after checking the policy.
    fn classes(&self) -> Result<Vec<Vec<char>>, PolicyError> {
        if !(MIN_LENGTH..=MAX_LENGTH).contains(&self.length) {
            return Err(PolicyError::LengthOutOfRange(self.length));
        }
        let enabled = [
            (self.lowercase, "lowercase", LOWERCASE),
            (self.uppercase, "uppercase", UPPERCASE),
            (self.digits, "digits", DIGITS),
            (self.symbols, "symbols", SAFE_SYMBOLS),
        ];
        let mut classes = Vec::new();
        for (on, name, chars) in enabled {
            if !on {
                continue;
            }
            let class: Vec<char> = chars
                .chars()
                .filter(|c| !self.exclude.contains(*c))
                .collect();
            if class.is_empty() {
                return Err(PolicyError::EmptyClass(name));
            }
            classes.push(class);
        }
        if classes.is_empty() {
            return Err(PolicyError::NoClass);
        }
        // Cannot happen while MIN_LENGTH exceeds the number of classes; kept so that
        // lowering MIN_LENGTH cannot make `generate` index out of bounds.
        if self.length < classes.len() {
            return Err(PolicyError::TooShortForClasses {
                length: self.length,
                classes: classes.len(),
            });
        }
        Ok(classes)
    }
}

/// A uniform integer in `0..bound` (bound >= 1): draws 32 random bits and rejects the values
/// in the incomplete last block, so no residue is more likely than another (no modulo bias).
fn uniform_below(rng: &mut OsRng, bound: usize) -> Result<usize, PolicyError> {
    // Bounds here are at most MAX_LENGTH or an alphabet size, far below u32::MAX.
    let bound = u32::try_from(bound).map_err(|_| PolicyError::LengthOutOfRange(bound))?;
    // The largest multiple of `bound` that fits; values at or above it are rejected.
    let zone = u32::MAX - (u32::MAX % bound);
    loop {
        let draw = rng
            .try_next_u32()
            .map_err(|e| PolicyError::Entropy(e.to_string()))?;
        if draw < zone {
            return Ok((draw % bound) as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORBIDDEN: &str = "'\"\\`$%@:/?#&=+";

    fn provider() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }

    #[test]
    fn default_policy_gives_32_chars_with_every_class() {
        provider();
        let value = PasswordPolicy::default().generate().unwrap();
        let s = value.expose();
        assert_eq!(s.chars().count(), 32);
        assert!(s.chars().any(|c| c.is_ascii_lowercase()));
        assert!(s.chars().any(|c| c.is_ascii_uppercase()));
        assert!(s.chars().any(|c| c.is_ascii_digit()));
        assert!(s.chars().any(|c| SAFE_SYMBOLS.contains(c)));
    }

    #[test]
    fn no_forbidden_character_in_10000_samples_and_classes_always_present() {
        provider();
        let policy = PasswordPolicy {
            length: 12,
            ..PasswordPolicy::default()
        };
        for _ in 0..10_000 {
            let value = policy.generate().unwrap();
            let s = value.expose();
            assert_eq!(s.len(), 12);
            for c in s.chars() {
                assert!(!FORBIDDEN.contains(c), "forbidden {c:?} in a password");
                assert!(c.is_ascii_graphic(), "non-printable {c:?} in a password");
                assert!(
                    c.is_ascii_alphanumeric() || SAFE_SYMBOLS.contains(c),
                    "{c:?} is outside the policy's classes"
                );
            }
            // Symbols are the smallest class (about 1 in 4.5 characters); without forcing,
            // some 12-character samples would lack one.
            assert!(s.chars().any(|c| SAFE_SYMBOLS.contains(c)), "{s}");
            assert!(s.chars().any(|c| c.is_ascii_digit()), "{s}");
            assert!(s.chars().any(|c| c.is_ascii_lowercase()), "{s}");
            assert!(s.chars().any(|c| c.is_ascii_uppercase()), "{s}");
        }
    }

    #[test]
    fn disabled_classes_and_excluded_chars_never_appear() {
        provider();
        let policy = PasswordPolicy {
            length: 64,
            uppercase: false,
            symbols: false,
            exclude: "l10o".into(),
            ..PasswordPolicy::default()
        };
        for _ in 0..1_000 {
            let value = policy.generate().unwrap();
            let s = value.expose();
            assert_eq!(s.len(), 64);
            assert!(
                s.chars()
                    .all(|c| (c.is_ascii_lowercase() || c.is_ascii_digit()) && !"l10o".contains(c)),
                "{s}"
            );
        }
    }

    #[test]
    fn every_character_of_the_alphabet_is_used() {
        provider();
        // A biased or truncated draw would leave some characters out over this many samples.
        let policy = PasswordPolicy {
            length: 256,
            ..PasswordPolicy::default()
        };
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..100 {
            seen.extend(policy.generate().unwrap().expose().chars());
        }
        assert_eq!(seen.len(), 26 + 26 + 10 + SAFE_SYMBOLS.len());
    }

    #[test]
    fn impossible_policies_are_rejected() {
        provider();
        let none = PasswordPolicy {
            lowercase: false,
            uppercase: false,
            digits: false,
            symbols: false,
            ..PasswordPolicy::default()
        };
        assert!(matches!(none.generate(), Err(PolicyError::NoClass)));
        let short = PasswordPolicy {
            length: 8,
            ..PasswordPolicy::default()
        };
        assert!(matches!(
            short.generate(),
            Err(PolicyError::LengthOutOfRange(8))
        ));
        let long = PasswordPolicy {
            length: 257,
            ..PasswordPolicy::default()
        };
        assert!(matches!(
            long.validate(),
            Err(PolicyError::LengthOutOfRange(257))
        ));
        let emptied = PasswordPolicy {
            exclude: DIGITS.into(),
            ..PasswordPolicy::default()
        };
        let err = emptied.generate().unwrap_err();
        assert!(matches!(err, PolicyError::EmptyClass("digits")));
        assert!(err.to_string().contains("digits"));
    }

    #[test]
    fn policy_deserializes_with_defaults_and_rejects_unknown_keys() {
        provider();
        let policy: PasswordPolicy = toml::from_str("length = 40\nsymbols = false").unwrap();
        assert_eq!(
            policy,
            PasswordPolicy {
                length: 40,
                symbols: false,
                ..PasswordPolicy::default()
            }
        );
        assert!(toml::from_str::<PasswordPolicy>("lenght = 40").is_err());
    }
}
