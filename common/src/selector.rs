//! Workload selectors of the `unix` attestor (`unix:uid:1000`, `unix:path:/usr/bin/app`),
//! parsed once from text or from the protobuf message, so registration matching compares
//! typed values instead of strings.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::spiffe_id::ShownInput;
use mayfly_proto::v1;

/// The only attestor Mayfly has; other types are rejected rather than carried along
/// unmatched, so a typo in a registration cannot silently match nothing.
const UNIX_TYPE: &str = "unix";

const ACCEPTED_FORMS: &str = "unix:uid:<number>, unix:user:<name>, unix:gid:<number>, \
     unix:group:<name>, unix:path:</absolute/path> or unix:sha256:<64 hex digits>";

/// One property of a workload process, as found by the `unix` attestor.
#[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Selector {
    Uid(u32),
    User(String),
    Gid(u32),
    Group(String),
    /// Absolute path of the process's executable.
    Path(String),
    /// SHA-256 digest of the process's executable.
    Sha256([u8; 32]),
}

/// Why a string or protobuf message is not a selector.
#[non_exhaustive]
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum SelectorError {
    #[error("unknown selector type{found}; only `unix` is supported: {ACCEPTED_FORMS}")]
    UnknownType { found: ShownInput },
    #[error("unknown unix selector kind{found}; expected one of {ACCEPTED_FORMS}")]
    UnknownKind { found: ShownInput },
    #[error(
        "`unix:{kind}:` needs a decimal number from 0 to 4294967295{found}; for a name use `unix:{name_kind}:<name>`"
    )]
    BadNumber {
        kind: &'static str,
        name_kind: &'static str,
        found: ShownInput,
    },
    #[error("`unix:{kind}:` needs a non-empty name, as in `unix:{kind}:app`")]
    EmptyName { kind: &'static str },
    #[error("`unix:path:` needs an absolute path starting with `/`{found}")]
    RelativePath { found: ShownInput },
    #[error("`unix:sha256:` needs exactly 64 hex digits{found}")]
    BadSha256 { found: ShownInput },
}

impl Selector {
    /// Parses the text form `unix:<kind>:<value>`.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let (selector_type, rest) = input.split_once(':').unwrap_or((input, ""));
        if selector_type != UNIX_TYPE {
            return Err(SelectorError::UnknownType {
                found: ShownInput::new(selector_type),
            });
        }
        Self::parse_unix_value(rest)
    }

    /// Parses the part after `unix:`, which is also the protobuf message's `value`.
    fn parse_unix_value(value: &str) -> Result<Self, SelectorError> {
        // A missing `:` means an empty value; the kind's own check then says what it needs.
        let (kind, value) = value.split_once(':').unwrap_or((value, ""));
        match kind {
            "uid" => parse_id(value, "uid", "user").map(Self::Uid),
            "gid" => parse_id(value, "gid", "group").map(Self::Gid),
            "user" => parse_name(value, "user").map(Self::User),
            "group" => parse_name(value, "group").map(Self::Group),
            "path" if value.starts_with('/') => Ok(Self::Path(value.to_owned())),
            "path" => Err(SelectorError::RelativePath {
                found: ShownInput::new(value),
            }),
            "sha256" => parse_sha256(value).map(Self::Sha256),
            _ => Err(SelectorError::UnknownKind {
                found: ShownInput::new(kind),
            }),
        }
    }

    /// The protobuf `value` and the text form after `unix:`, such as `uid:1000`.
    fn unix_value(&self) -> UnixValue<'_> {
        UnixValue(self)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{UNIX_TYPE}:{}", self.unix_value())
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for Selector {
    type Error = SelectorError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<Selector> for String {
    fn from(selector: Selector) -> Self {
        selector.to_string()
    }
}

impl From<&Selector> for v1::Selector {
    fn from(selector: &Selector) -> Self {
        Self {
            r#type: UNIX_TYPE.to_owned(),
            value: selector.unix_value().to_string(),
        }
    }
}

impl TryFrom<&v1::Selector> for Selector {
    type Error = SelectorError;

    fn try_from(message: &v1::Selector) -> Result<Self, Self::Error> {
        if message.r#type != UNIX_TYPE {
            return Err(SelectorError::UnknownType {
                found: ShownInput::new(&message.r#type),
            });
        }
        Self::parse_unix_value(&message.value)
    }
}

struct UnixValue<'a>(&'a Selector);

impl fmt::Display for UnixValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Selector::Uid(uid) => write!(f, "uid:{uid}"),
            Selector::User(name) => write!(f, "user:{name}"),
            Selector::Gid(gid) => write!(f, "gid:{gid}"),
            Selector::Group(name) => write!(f, "group:{name}"),
            Selector::Path(path) => write!(f, "path:{path}"),
            Selector::Sha256(digest) => {
                f.write_str("sha256:")?;
                digest.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
            }
        }
    }
}

fn parse_id(
    value: &str,
    kind: &'static str,
    name_kind: &'static str,
) -> Result<u32, SelectorError> {
    let bad = || SelectorError::BadNumber {
        kind,
        name_kind,
        found: ShownInput::new(value),
    };
    // `u32::from_str` alone would also take a leading `+`.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    value.parse().map_err(|_| bad())
}

fn parse_name(value: &str, kind: &'static str) -> Result<String, SelectorError> {
    if value.is_empty() {
        return Err(SelectorError::EmptyName { kind });
    }
    Ok(value.to_owned())
}

fn parse_sha256(value: &str) -> Result<[u8; 32], SelectorError> {
    let bad = || SelectorError::BadSha256 {
        found: ShownInput::new(value),
    };
    if value.len() != 64 {
        return Err(bad());
    }
    let mut digest = [0u8; 32];
    for (byte, pair) in digest.iter_mut().zip(value.as_bytes().chunks_exact(2)) {
        let high = hex_digit(pair[0]).ok_or_else(bad)?;
        let low = hex_digit(pair[1]).ok_or_else(bad)?;
        *byte = (high << 4) | low;
    }
    Ok(digest)
}

fn hex_digit(c: u8) -> Option<u8> {
    // `to_digit` folds case, which is the point: either case is accepted.
    char::from(c)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde::de::IntoDeserializer;
    use serde::de::value::{Error as DeError, StrDeserializer};

    use super::*;

    const DIGEST_HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_every_kind() {
        assert_eq!(Selector::parse("unix:uid:1000"), Ok(Selector::Uid(1000)));
        assert_eq!(Selector::parse("unix:gid:0"), Ok(Selector::Gid(0)));
        assert_eq!(
            Selector::parse("unix:user:app"),
            Ok(Selector::User("app".into()))
        );
        assert_eq!(
            Selector::parse("unix:group:staff"),
            Ok(Selector::Group("staff".into()))
        );
        assert_eq!(
            Selector::parse("unix:path:/usr/bin/app"),
            Ok(Selector::Path("/usr/bin/app".into()))
        );
        let Ok(Selector::Sha256(digest)) = Selector::parse(&format!("unix:sha256:{DIGEST_HEX}"))
        else {
            panic!("sha256 selector did not parse");
        };
        assert_eq!(digest[0], 0xe3);
        assert_eq!(digest[31], 0x55);
    }

    #[test]
    fn sha256_accepts_uppercase_and_prints_lowercase() {
        let upper = format!("unix:sha256:{}", DIGEST_HEX.to_uppercase());
        let selector = Selector::parse(&upper).unwrap();
        assert_eq!(selector.to_string(), format!("unix:sha256:{DIGEST_HEX}"));
    }

    #[test]
    fn uid_max_parses_and_overflow_fails() {
        assert_eq!(
            Selector::parse("unix:uid:4294967295"),
            Ok(Selector::Uid(u32::MAX))
        );
        assert!(matches!(
            Selector::parse("unix:uid:4294967296"),
            Err(SelectorError::BadNumber { kind: "uid", .. })
        ));
    }

    #[test]
    fn rejects_each_problem() {
        use SelectorError as E;
        type Check = fn(&SelectorError) -> bool;
        let cases: [(&str, Check); 14] = [
            ("k8s:ns:default", |e| matches!(e, E::UnknownType { .. })),
            ("Unix:uid:1", |e| matches!(e, E::UnknownType { .. })),
            ("", |e| matches!(e, E::UnknownType { .. })),
            ("unix:pid:1", |e| matches!(e, E::UnknownKind { .. })),
            ("unix:", |e| matches!(e, E::UnknownKind { .. })),
            ("unix:uid:abc", |e| {
                matches!(e, E::BadNumber { kind: "uid", .. })
            }),
            ("unix:uid:+1", |e| matches!(e, E::BadNumber { .. })),
            ("unix:uid:-1", |e| matches!(e, E::BadNumber { .. })),
            ("unix:gid", |e| {
                matches!(e, E::BadNumber { kind: "gid", .. })
            }),
            ("unix:user:", |e| matches!(e, E::EmptyName { kind: "user" })),
            ("unix:group", |e| {
                matches!(e, E::EmptyName { kind: "group" })
            }),
            ("unix:path:bin/app", |e| matches!(e, E::RelativePath { .. })),
            ("unix:path:", |e| matches!(e, E::RelativePath { .. })),
            ("unix:sha256:abc", |e| matches!(e, E::BadSha256 { .. })),
        ];
        for (input, check) in cases {
            let error = Selector::parse(input).unwrap_err();
            assert!(check(&error), "{input}: got {error:?}");
        }
        let not_hex = format!("unix:sha256:{}g", &DIGEST_HEX[1..]);
        assert!(matches!(
            Selector::parse(&not_hex),
            Err(SelectorError::BadSha256 { .. })
        ));
        // Multi-byte characters must be rejected, not split mid-character.
        let multibyte = format!("unix:sha256:{}é", &DIGEST_HEX[2..]);
        assert!(matches!(
            Selector::parse(&multibyte),
            Err(SelectorError::BadSha256 { .. })
        ));
    }

    #[test]
    fn error_messages_name_the_problem_and_the_accepted_forms() {
        let message = Selector::parse("k8s:ns:default").unwrap_err().to_string();
        assert!(message.starts_with("unknown selector type: `k8s`; only `unix` is supported"));
        assert!(message.contains("unix:sha256:<64 hex digits>"), "{message}");
        assert_eq!(
            Selector::parse("unix:uid:app").unwrap_err().to_string(),
            "`unix:uid:` needs a decimal number from 0 to 4294967295: `app`; for a name use `unix:user:<name>`"
        );
        assert_eq!(
            Selector::parse("unix:path:bin/app")
                .unwrap_err()
                .to_string(),
            "`unix:path:` needs an absolute path starting with `/`: `bin/app`"
        );
    }

    #[test]
    fn names_may_contain_colons() {
        let selector = Selector::parse("unix:user:domain:app").unwrap();
        assert_eq!(selector, Selector::User("domain:app".into()));
        assert_eq!(selector.to_string(), "unix:user:domain:app");
    }

    #[test]
    fn converts_to_and_from_protobuf() {
        let message = v1::Selector::from(&Selector::Uid(1000));
        assert_eq!(message.r#type, "unix");
        assert_eq!(message.value, "uid:1000");
        assert_eq!(Selector::try_from(&message), Ok(Selector::Uid(1000)));

        let foreign = v1::Selector {
            r#type: "docker".into(),
            value: "label:app".into(),
        };
        assert!(matches!(
            Selector::try_from(&foreign),
            Err(SelectorError::UnknownType { .. })
        ));
        let bad_value = v1::Selector {
            r#type: "unix".into(),
            value: "path:relative".into(),
        };
        assert!(matches!(
            Selector::try_from(&bad_value),
            Err(SelectorError::RelativePath { .. })
        ));
    }

    #[test]
    fn serde_uses_the_text_form() {
        let de: StrDeserializer<'_, DeError> = "unix:gid:100".into_deserializer();
        assert_eq!(Selector::deserialize(de), Ok(Selector::Gid(100)));
        let de: StrDeserializer<'_, DeError> = "unix:gid:staff".into_deserializer();
        assert!(Selector::deserialize(de).is_err());
        assert_eq!(String::from(Selector::Gid(100)), "unix:gid:100");
    }

    fn selector() -> impl Strategy<Value = Selector> {
        prop_oneof![
            any::<u32>().prop_map(Selector::Uid),
            any::<u32>().prop_map(Selector::Gid),
            "[^\\x00]{1,20}".prop_map(Selector::User),
            "[^\\x00]{1,20}".prop_map(Selector::Group),
            "/[^\\x00]{0,40}".prop_map(Selector::Path),
            any::<[u8; 32]>().prop_map(Selector::Sha256),
        ]
    }

    proptest! {
        #[test]
        fn text_and_protobuf_forms_round_trip(selector in selector()) {
            prop_assert_eq!(Selector::parse(&selector.to_string()), Ok(selector.clone()));
            let message = v1::Selector::from(&selector);
            prop_assert_eq!(Selector::try_from(&message), Ok(selector.clone()));
            prop_assert_eq!(format!("unix:{}", message.value), selector.to_string());
        }
    }
}
