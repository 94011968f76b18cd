use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;
use crate::store::EntryRecord;

/// A clock the test sets.
struct TestClock(Mutex<SystemTime>);

impl Clock for TestClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().expect("clock")
    }
}

/// 2026-12-05T00:00:00Z plus `hours`.
fn at_hour(hours: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_796_428_800 + hours * 3600)
}

fn engine_with(files: &[(&str, &str)], enforce: bool) -> (PolicyEngine, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write policy");
    }
    let config = PolicyConfig {
        dir: Some(dir.path().to_path_buf()),
        enforce,
        defaults: true,
    };
    let clock = Arc::new(TestClock(Mutex::new(at_hour(12))));
    (PolicyEngine::load(config, clock).expect("load"), dir)
}

fn entry() -> EntryRecord {
    EntryRecord {
        id: "e-1".into(),
        spiffe_id: "spiffe://example.org/orders".into(),
        parent_id: "spiffe://example.org/node/a".into(),
        selectors: vec!["unix:uid:1000".into()],
        ..Default::default()
    }
}

fn context<'a>(node: &'a str, method: &'a str) -> AccessContext<'a> {
    AccessContext {
        node,
        selectors: &[],
        ttl_seconds: 0,
        source: Source::NodeApi,
        method,
        elevation: None,
    }
}

fn jwt(audience: &str) -> Access<'_> {
    Access {
        principal: Principal::Workload {
            spiffe_id: "spiffe://example.org/orders",
        },
        action: Action::MintJwtSvid,
        resource: Resource::Audience(audience),
        context: context("spiffe://example.org/node/a", "MintJwtSvid"),
    }
}

const GRANTS: &[String] = &[];

fn credential<'a>(holder: &'a str, grants: &'a [String]) -> Access<'a> {
    Access {
        principal: Principal::Workload { spiffe_id: holder },
        action: Action::ObtainCredential,
        resource: Resource::Credential {
            name: "orders-db",
            kind: "postgres_dynamic",
            grants,
            sets: &[],
            max_ttl_seconds: 86_400,
        },
        context: context("spiffe://example.org/node/a", "IssueCredential"),
    }
}

#[test]
fn the_shipped_schema_and_built_in_policies_load_and_validate() {
    let (engine, _dir) = engine_with(&[], true);
    let active = engine.current();
    assert_eq!(active.listing[0].0, mayfly_common::policy::DEFAULTS_NAME);
    assert!(
        active.listing[0]
            .1
            .contains(&"mayfly-default-credential".to_string())
    );
    assert_eq!(active.hash.len(), 64);
}

#[test]
fn every_request_the_daemon_builds_conforms_to_the_schema() {
    let (engine, _dir) = engine_with(&[], true);
    let entry = entry();
    let grants = vec!["spiffe://example.org/orders".to_string()];
    let sets = vec!["prod".to_string()];
    let to_agent = vec!["spiffe://example.org/node/a".to_string()];
    let accesses = [
        Access {
            principal: Principal::Workload {
                spiffe_id: "spiffe://example.org/orders",
            },
            action: Action::SignX509Svid,
            resource: Resource::Entry(entry_facts(&entry)),
            context: context("spiffe://example.org/node/a", "SignSvids"),
        },
        jwt("billing"),
        Access {
            principal: Principal::Agent {
                spiffe_id: "spiffe://example.org/node/a",
            },
            action: Action::ReadSecret,
            resource: Resource::Secret {
                name: "db",
                grants: &to_agent,
                sets: &sets,
            },
            context: context("spiffe://example.org/node/a", "Sync"),
        },
        credential("spiffe://example.org/orders", &grants),
        Access {
            principal: Principal::Operator {
                uid: 0,
                name: "root",
            },
            action: Action::of_admin_method("CreateEntry"),
            resource: Resource::AdminCall("CreateEntry"),
            context: AccessContext {
                node: "",
                selectors: &[],
                ttl_seconds: 0,
                source: Source::AdminSocket,
                method: "CreateEntry",
                elevation: None,
            },
        },
    ];
    for access in accesses {
        access
            .cedar_request_checked(
                engine.decider().actions(),
                SystemTime::now(),
                engine.decider().schema(),
            )
            .unwrap_or_else(|e| panic!("{:?} does not conform: {e}", access.action));
        assert!(
            engine.decide(&access).allowed,
            "the built-in policies allow {:?}",
            access.action
        );
    }
}

#[test]
fn built_in_policies_grant_a_credential_to_its_grantees_only() {
    let (engine, _dir) = engine_with(&[], true);
    let grants = vec!["spiffe://example.org/orders".to_string()];
    let allowed = engine.decide(&credential("spiffe://example.org/orders", &grants));
    assert!(allowed.allowed);
    assert_eq!(allowed.policies, ["mayfly-default-credential"]);
    let denied = engine.decide(&credential("spiffe://example.org/web", &grants));
    assert!(!denied.allowed);
    assert!(denied.policies.is_empty());
    assert!(
        denied
            .denial()
            .starts_with("not granted: no policy permits it (policy set ")
    );
    assert!(
        !engine
            .decide(&credential("spiffe://example.org/orders", GRANTS))
            .allowed
    );
}

#[test]
fn a_forbid_on_one_audience_wins_over_the_built_in_permit() {
    let (engine, _dir) = engine_with(
        &[(
            "jwt.cedar",
            r#"@id("no-billing-tokens")
forbid(principal, action == Mayfly::Action::"mint_jwt_svid", resource == Mayfly::Audience::"billing");"#,
        )],
        true,
    );
    let denied = engine.decide(&jwt("billing"));
    assert!(!denied.allowed);
    assert_eq!(denied.policies, ["no-billing-tokens"]);
    assert!(
        denied
            .denial()
            .contains("denied by policy no-billing-tokens")
    );
    assert!(engine.authorize(&jwt("billing"), "jwt.mint").is_err());
    assert!(engine.decide(&jwt("orders")).allowed);
}

#[test]
fn a_forbid_on_an_entry_set_stops_the_entries_in_it_only() {
    let (engine, _dir) = engine_with(
        &[(
            "frozen.cedar",
            r#"@id("frozen-entries")
forbid(principal, action == Mayfly::Action::"sign_x509_svid", resource in Mayfly::EntrySet::"frozen");"#,
        )],
        true,
    );
    let sign = |entry: &EntryRecord| {
        engine.decide(&Access {
            principal: Principal::Workload {
                spiffe_id: "spiffe://example.org/orders",
            },
            action: Action::SignX509Svid,
            resource: Resource::Entry(entry_facts(entry)),
            context: context("spiffe://example.org/node/a", "SignSvids"),
        })
    };
    let mut frozen = entry();
    frozen.sets = vec!["frozen".into(), "prod".into()];
    let denied = sign(&frozen);
    assert!(!denied.allowed);
    assert_eq!(denied.policies, ["frozen-entries"]);
    let mut other = entry();
    other.sets = vec!["prod".into()];
    assert!(sign(&other).allowed);
    assert!(sign(&entry()).allowed);
}

#[test]
fn a_time_window_follows_the_injected_clock() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("hours.cedar"),
        r#"@id("office-hours")
forbid(principal, action == Mayfly::Action::"obtain_credential", resource)
unless { context.time.toTime() >= duration("7h") && context.time.toTime() < duration("19h") };"#,
    )
    .expect("write");
    let clock = Arc::new(TestClock(Mutex::new(at_hour(12))));
    let config = PolicyConfig {
        dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let engine = PolicyEngine::load(config, clock.clone()).expect("load");
    let grants = vec!["spiffe://example.org/orders".to_string()];
    let access = credential("spiffe://example.org/orders", &grants);
    assert!(engine.decide(&access).allowed, "12:00 is inside");
    *clock.0.lock().expect("clock") = at_hour(20);
    let late = engine.decide(&access);
    assert!(!late.allowed, "20:00 is outside");
    assert_eq!(late.policies, ["office-hours"]);
    *clock.0.lock().expect("clock") = at_hour(24 + 7);
    assert!(
        engine.decide(&access).allowed,
        "07:00 the next day is inside"
    );
}

#[test]
fn shadow_mode_lets_a_denied_request_through_and_says_so() {
    let (engine, _dir) = engine_with(
        &[(
            "jwt.cedar",
            r#"forbid(principal, action == Mayfly::Action::"mint_jwt_svid", resource);"#,
        )],
        false,
    );
    let decision = engine
        .authorize(&jwt("billing"), "jwt.mint")
        .expect("not enforced");
    assert!(!decision.allowed);
    assert!(decision.granted());
    assert_eq!(
        decision.policies,
        ["jwt.cedar#1"],
        "unnamed policies go by file and place"
    );
}

fn refused(files: &[(&str, &str)]) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write policy");
    }
    let config = PolicyConfig {
        dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let clock = Arc::new(TestClock(Mutex::new(at_hour(12))));
    match PolicyEngine::load(config, clock) {
        Ok(_) => panic!("{files:?} loaded"),
        Err(e) => e.problems(),
    }
}

#[test]
fn a_broken_file_is_refused_with_its_file_line_and_column() {
    let problems = refused(&[(
        "broken.cedar",
        "permit(principal, action, resource);\n\npermit(principal, action resource);\n",
    )]);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with("broken.cedar:3:"), "{problems:?}");
}

#[test]
fn an_unknown_entity_type_or_attribute_is_refused_by_name_and_place() {
    let problems = refused(&[(
        "types.cedar",
        "permit(principal is Mayfly::Robot, action, resource);\n",
    )]);
    assert!(
        problems[0].starts_with("types.cedar:1:") && problems[0].contains("Mayfly::Robot"),
        "{problems:?}"
    );
    let problems = refused(&[(
        "attrs.cedar",
        "// a comment\npermit(principal, action == Mayfly::Action::\"obtain_credential\", resource)\nwhen { resource.owner == \"x\" };\n",
    )]);
    assert!(
        problems[0].starts_with("attrs.cedar:3:") && problems[0].contains("owner"),
        "{problems:?}"
    );
}

#[test]
fn duplicate_ids_and_templates_are_refused() {
    let problems = refused(&[
        ("a.cedar", "@id(\"x\") permit(principal, action, resource);"),
        ("b.cedar", "@id(\"x\") forbid(principal, action, resource);"),
    ]);
    assert!(
        problems[0].contains("`x` is already used in a.cedar"),
        "{problems:?}"
    );
    let problems = refused(&[(
        "t.cedar",
        "permit(principal == ?principal, action, resource);",
    )]);
    assert!(problems[0].contains("templates"), "{problems:?}");
}

#[tokio::test]
async fn a_reload_that_does_not_validate_leaves_the_active_set_deciding() {
    let (engine, dir) = engine_with(
        &[(
            "jwt.cedar",
            r#"forbid(principal, action == Mayfly::Action::"mint_jwt_svid", resource == Mayfly::Audience::"billing");"#,
        )],
        true,
    );
    let before = engine.current().hash.clone();
    std::fs::write(dir.path().join("jwt.cedar"), "forbid(principal, action").expect("write");
    let error = engine.reload(&Actor::Daemon).await.err().expect("refused");
    assert!(error.to_string().contains("jwt.cedar:1:"), "{error}");
    assert_eq!(engine.current().hash, before);
    assert!(
        !engine.decide(&jwt("billing")).allowed,
        "the old set still decides"
    );

    std::fs::remove_file(dir.path().join("jwt.cedar")).expect("remove");
    let after = engine.reload(&Actor::Daemon).await.expect("reloaded");
    assert_ne!(after.hash, before);
    assert!(engine.decide(&jwt("billing")).allowed);
}

#[test]
fn admin_methods_map_to_their_actions() {
    assert_eq!(Action::of_admin_method("ListEntries"), Action::AdminRead);
    assert_eq!(Action::of_admin_method("GetSecretValue"), Action::AdminRead);
    assert_eq!(Action::of_admin_method("RotateSecret"), Action::Rotate);
    assert_eq!(Action::of_admin_method("Revoke"), Action::Revoke);
    assert_eq!(Action::of_admin_method("TaintCa"), Action::Revoke);
    assert_eq!(Action::of_admin_method("CreateEntry"), Action::AdminWrite);
    assert_eq!(
        Action::parse("Mayfly::Action::\"mint_jwt_svid\""),
        Some(Action::MintJwtSvid)
    );
    assert_eq!(
        Action::parse("obtain_credential"),
        Some(Action::ObtainCredential)
    );
    assert_eq!(Action::parse("fly"), None);
}
