use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cedar_policy::Authorizer;

use super::*;

/// Cedar's own decision over the whole set, as the index must reproduce it.
fn whole_set(
    decider: &Decider,
    set: &ActiveSet,
    access: &Access<'_>,
    now: SystemTime,
) -> (bool, Vec<String>) {
    let (request, entities) = access
        .cedar_request_checked(decider.actions(), now, decider.schema())
        .expect("the request conforms to the schema");
    let response = Authorizer::new().is_authorized(&request, &set.all, &entities);
    let mut reasons: Vec<String> = response
        .diagnostics()
        .reason()
        .map(|id| id.to_string())
        .collect();
    reasons.sort();
    (response.decision() == Decision::Allow, reasons)
}

const POLICIES: &str = r#"
@id("aud-forbid") forbid(principal, action == Mayfly::Action::"mint_jwt_svid", resource == Mayfly::Audience::"billing");
@id("aud-permit") permit(principal, action == Mayfly::Action::"mint_jwt_svid", resource == Mayfly::Audience::"orders");
@id("w1-cred") permit(principal == Mayfly::Workload::"spiffe://example.org/w1", action == Mayfly::Action::"obtain_credential", resource);
@id("w2-no-cred") forbid(principal == Mayfly::Workload::"spiffe://example.org/w2", action, resource);
@id("set-hours") forbid(principal, action == Mayfly::Action::"obtain_credential", resource in Mayfly::CredentialSet::"prod")
  unless { context.time.toTime() >= duration("7h") && context.time.toTime() < duration("19h") };
@id("set-permit") permit(principal, action in [Mayfly::Action::"read_secret", Mayfly::Action::"obtain_credential"], resource in Mayfly::SecretSet::"shared");
@id("node-q") forbid(principal, action == Mayfly::Action::"sign_x509_svid", resource) when { context.node == "spiffe://example.org/node/q" };
@id("uid-0") forbid(principal, action, resource is Mayfly::Entry) when { context.selectors.contains("unix:uid:0") };
@id("entry-set") forbid(principal, action == Mayfly::Action::"sign_x509_svid", resource in Mayfly::EntrySet::"prod") when { context.node == "spiffe://example.org/node/a" };
@id("ops") forbid(principal is Mayfly::Operator, action in Mayfly::Action::"admin", resource == Mayfly::AdminCall::"DeleteEntry") unless { principal.uid == 0 };
"#;

/// The built-in policies and [`POLICIES`], enforced.
fn with_policies(decider: &Decider) -> ActiveSet {
    decider
        .compile(
            vec![
                PolicySource::defaults(),
                PolicySource {
                    name: "p.cedar".into(),
                    text: POLICIES.into(),
                },
            ],
            true,
        )
        .expect("compiles")
}

#[test]
fn the_index_decides_exactly_as_cedar_over_the_whole_set() {
    let decider = Decider::new().expect("schema");
    let set = with_policies(&decider);
    let workloads = [
        "spiffe://example.org/w1",
        "spiffe://example.org/w2",
        "spiffe://example.org/w3",
    ];
    let nodes = ["spiffe://example.org/node/a", "spiffe://example.org/node/q"];
    let selectors = [
        vec!["unix:uid:0".to_string()],
        vec!["unix:uid:1000".to_string()],
    ];
    let grants = vec!["spiffe://example.org/w3".to_string()];
    let sets = [
        Vec::new(),
        vec!["prod".to_string()],
        vec!["shared".to_string()],
    ];
    let mut checked = 0;
    for hour in [3u64, 12] {
        let now = UNIX_EPOCH + Duration::from_secs(1_796_428_800 + hour * 3600);
        for workload in workloads {
            for node in nodes {
                for sel in &selectors {
                    for set_names in &sets {
                        let facts = EntryFacts {
                            id: "e1",
                            spiffe_id: workload,
                            parent: node,
                            selectors: sel,
                            hint: "",
                            sets: set_names,
                        };
                        let context = AccessContext {
                            node,
                            selectors: sel,
                            ttl_seconds: 60,
                            source: Source::NodeApi,
                            method: "test",
                            elevation: None,
                        };
                        let principal = Principal::Workload {
                            spiffe_id: workload,
                        };
                        let mut accesses = vec![
                            Access {
                                principal,
                                action: Action::SignX509Svid,
                                resource: Resource::Entry(facts),
                                context,
                            },
                            Access {
                                principal,
                                action: Action::ReadSecret,
                                resource: Resource::Secret {
                                    name: "s",
                                    grants: &grants,
                                    sets: set_names,
                                },
                                context,
                            },
                            Access {
                                principal,
                                action: Action::ObtainCredential,
                                resource: Resource::Credential {
                                    name: "c",
                                    kind: "postgres_dynamic",
                                    grants: &grants,
                                    sets: set_names,
                                    max_ttl_seconds: 3600,
                                },
                                context,
                            },
                        ];
                        for aud in ["billing", "orders", "other"] {
                            accesses.push(Access {
                                principal,
                                action: Action::MintJwtSvid,
                                resource: Resource::Audience(aud),
                                context,
                            });
                        }
                        for uid in [0, 1000] {
                            accesses.push(Access {
                                principal: Principal::Operator { uid, name: "" },
                                action: Action::of_admin_method("DeleteEntry"),
                                resource: Resource::AdminCall("DeleteEntry"),
                                context,
                            });
                        }
                        for access in &accesses {
                            let indexed = decider.decide(&set, access, now);
                            assert_eq!(
                                (indexed.allowed, indexed.policies.clone()),
                                whole_set(&decider, &set, access, now),
                                "{access:?} at {hour}:00"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 300);
}

/// Each action entity as "uid in [parents]", sorted, to compare two sets of them.
fn described(actions: &[cedar_policy::Entity]) -> Vec<String> {
    let mut all: Vec<String> = actions
        .iter()
        .map(|e| {
            let (uid, _, parents) = e.clone().into_inner();
            let mut parents: Vec<String> = parents.iter().map(|p| p.to_string()).collect();
            parents.sort();
            format!("{uid} in {parents:?}")
        })
        .collect();
    all.sort();
    all
}

#[test]
fn the_actions_built_without_the_schema_are_the_schemas() {
    let schema = schema().expect("schema");
    let declared = schema_action_entities(&schema).expect("actions");
    assert_eq!(described(&compile::action_entities()), described(&declared));
}

#[test]
fn an_unvalidated_decider_decides_as_a_validating_one() {
    let validating = Decider::new().expect("schema");
    let agent = Decider::unvalidated();
    let sources = vec![
        PolicySource::defaults(),
        PolicySource {
            name: "p.cedar".into(),
            text: POLICIES.into(),
        },
    ];
    let a = validating.compile(sources.clone(), true).expect("compiles");
    let b = agent.compile(sources, true).expect("compiles");
    assert_eq!(a.hash, b.hash);
    let selectors = vec!["unix:uid:0".to_string()];
    let context = AccessContext {
        node: "spiffe://example.org/node/q",
        selectors: &selectors,
        ttl_seconds: 0,
        source: Source::WorkloadApi,
        method: "FetchJWTSVID",
        elevation: None,
    };
    for aud in ["billing", "orders"] {
        let access = Access {
            principal: Principal::Workload {
                spiffe_id: "spiffe://example.org/w1",
            },
            action: Action::MintJwtSvid,
            resource: Resource::Audience(aud),
            context,
        };
        let now = SystemTime::now();
        let (x, y) = (
            validating.decide(&a, &access, now),
            agent.decide(&b, &access, now),
        );
        assert_eq!((x.allowed, x.policies), (y.allowed, y.policies));
    }
}

#[test]
fn a_set_pushed_as_json_decides_as_the_set_it_came_from() {
    let decider = Decider::new().expect("schema");
    let sources = vec![
        PolicySource::defaults(),
        PolicySource {
            name: "p.cedar".into(),
            text: POLICIES.into(),
        },
    ];
    let set = decider.compile(sources, true).expect("compiles");
    let pushed = Decider::unvalidated()
        .compile_json(set.json(), set.hash.clone(), true)
        .expect("the JSON form reads back");
    assert_eq!(pushed.policy_count(), set.policy_count());
    let selectors = vec!["unix:uid:0".to_string()];
    let context = AccessContext {
        node: "spiffe://example.org/node/q",
        selectors: &selectors,
        ttl_seconds: 0,
        source: Source::WorkloadApi,
        method: "FetchJWTSVID",
        elevation: None,
    };
    let now = SystemTime::now();
    for aud in ["billing", "orders", "other"] {
        let access = Access {
            principal: Principal::Workload {
                spiffe_id: "spiffe://example.org/w1",
            },
            action: Action::MintJwtSvid,
            resource: Resource::Audience(aud),
            context,
        };
        let (a, b) = (
            decider.decide(&set, &access, now),
            decider.decide(&pushed, &access, now),
        );
        assert_eq!((a.allowed, a.policies), (b.allowed, b.policies), "{aud}");
    }
    assert!(
        Decider::unvalidated()
            .compile_json("{", "h".into(), true)
            .is_err()
    );
}

#[test]
fn only_policies_that_can_read_the_time_get_it() {
    let reads = |text: &str| {
        let policy = cedar_policy::Policy::parse(None, text).expect("parses");
        compile::may_read_time(&policy)
    };
    for text in [
        r#"permit(principal, action, resource) when { context.time.toTime() < duration("9h") };"#,
        r#"forbid(principal, action, resource) unless { context has time };"#,
        r#"forbid(principal, action, resource) when { context["time"] < datetime("2030-01-01") };"#,
        r#"forbid(principal, action, resource) when { context["\u{74}ime"] < datetime("2030-01-01") };"#,
        r#"forbid(principal, action, resource) when { context == {} };"#,
        r#"forbid(principal, action, resource) when { [context].contains(principal) };"#,
    ] {
        assert!(reads(text), "{text}");
    }
    for text in [
        r#"permit(principal, action, resource);"#,
        r#"forbid(principal, action, resource) when { context.node == "spiffe://example.org/node/q" };"#,
        r#"forbid(principal, action, resource) when { context.selectors.contains("time") };"#,
        r#"forbid(principal, action, resource) when { principal.time == 1 };"#,
    ] {
        assert!(!reads(text), "{text}");
    }
}

#[test]
fn a_remembered_decision_is_the_one_a_fresh_set_makes() {
    let decider = Decider::new().expect("schema");
    let compile = || with_policies(&decider);
    let set = compile();
    let (none, prod) = (Vec::new(), vec!["prod".to_string()]);
    let (root, user) = (
        vec!["unix:uid:0".to_string()],
        vec!["unix:uid:1000".to_string()],
    );
    let access =
        |node: &'static str, selectors: &'static [String], sets: &'static [String]| Access {
            principal: Principal::Workload {
                spiffe_id: "spiffe://example.org/w1",
            },
            action: Action::SignX509Svid,
            resource: Resource::Entry(EntryFacts {
                id: "e1",
                spiffe_id: "spiffe://example.org/w1",
                parent: node,
                selectors,
                hint: "",
                sets,
            }),
            context: AccessContext {
                node,
                selectors,
                ttl_seconds: 60,
                source: Source::NodeApi,
                method: "test",
                elevation: None,
            },
        };
    let leak = |v: &Vec<String>| -> &'static [String] { Box::leak(v.clone().into_boxed_slice()) };
    let (none, prod, root, user) = (leak(&none), leak(&prod), leak(&root), leak(&user));
    let now = UNIX_EPOCH + Duration::from_secs(1_796_428_800);
    // Each request differs from the first in one fact, and each is decided as a set that
    // has remembered nothing decides it, in either order, twice.
    let requests = [
        (access("spiffe://example.org/node/b", user, none), true),
        (access("spiffe://example.org/node/q", user, none), false),
        (access("spiffe://example.org/node/b", root, none), false),
        (access("spiffe://example.org/node/a", user, prod), false),
        (access("spiffe://example.org/node/a", user, none), true),
    ];
    for round in 0..2 {
        for (request, allowed) in requests.iter().chain(requests.iter().rev()) {
            let remembered = decider.decide(&set, request, now);
            let fresh = decider.decide(&compile(), request, now);
            assert_eq!(remembered.allowed, *allowed, "{request:?}, round {round}");
            assert_eq!(
                (remembered.allowed, &remembered.policies, &remembered.hash),
                (fresh.allowed, &fresh.policies, &fresh.hash),
                "{request:?}, round {round}"
            );
        }
    }
    assert_eq!(set.decisions.lock().unwrap().len(), requests.len());

    // An action whose policies read the time is decided at each time, never remembered.
    let grants = Vec::new();
    let credential = Access {
        principal: Principal::Workload {
            spiffe_id: "spiffe://example.org/w1",
        },
        action: Action::ObtainCredential,
        resource: Resource::Credential {
            name: "c",
            kind: "postgres_dynamic",
            grants: &grants,
            sets: prod,
            max_ttl_seconds: 3600,
        },
        context: requests[0].0.context,
    };
    let at = |hour: u64| UNIX_EPOCH + Duration::from_secs(1_796_428_800 + hour * 3600);
    let decided = |hour| decider.decide(&set, &credential, at(hour)).policies;
    assert_eq!(decided(3), vec!["set-hours".to_string()]);
    assert!(!decided(12).contains(&"set-hours".to_string()));
    assert_eq!(decided(3), vec!["set-hours".to_string()]);
    assert_eq!(set.decisions.lock().unwrap().len(), requests.len());
}

#[test]
fn two_requests_have_one_key_only_when_they_are_the_same() {
    let (ab, a_b) = (
        vec!["ab".to_string()],
        vec!["a".to_string(), "b".to_string()],
    );
    let with = |node: &'static str, method: &'static str, selectors: &'static [String]| {
        Access {
            principal: Principal::Agent {
                spiffe_id: "spiffe://example.org/node/a",
            },
            action: Action::ReadSecret,
            resource: Resource::AdminCall("x"),
            context: AccessContext {
                node,
                selectors,
                ttl_seconds: 0,
                source: Source::NodeApi,
                method,
                elevation: None,
            },
        }
        .key()
    };
    let ab: &'static [String] = Box::leak(ab.into_boxed_slice());
    let a_b: &'static [String] = Box::leak(a_b.into_boxed_slice());
    assert_eq!(with("n", "m", ab), with("n", "m", ab));
    // A boundary moved between two texts, or inside a list, is another request.
    assert_ne!(with("n", "m", ab), with("n", "m", a_b));
    assert_ne!(with("nm", "", ab), with("n", "m", ab));
    // So is a principal of another kind with the same name.
    let agent = with("n", "m", ab);
    let mut workload = Access {
        principal: Principal::Workload {
            spiffe_id: "spiffe://example.org/node/a",
        },
        action: Action::ReadSecret,
        resource: Resource::AdminCall("x"),
        context: AccessContext {
            node: "n",
            selectors: ab,
            ttl_seconds: 0,
            source: Source::NodeApi,
            method: "m",
            elevation: None,
        },
    };
    assert_ne!(workload.key(), agent);
    workload.context.elevation = Some(ElevationFacts::default());
    assert_ne!(
        workload.key(),
        Access {
            context: AccessContext {
                elevation: None,
                ..workload.context
            },
            ..workload
        }
        .key()
    );
}
