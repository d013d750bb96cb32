//! How long one decision takes: a route with 20 rules (4 deny, 16 allow, mixing groups, group
//! ids, users, email domains, method and path conditions) and a subject in 50 groups.
//! Figures only; nothing here can fail on a slow machine.
//!
//! `cargo bench -p portcullis-policy` (add `-- --measurement-time 2` for a quick run).

// Test code: a rule set that does not compile is a bug in the test itself.
#![allow(clippy::panic)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use portcullis_policy::{GroupRef, Policy, Request, RuleSpec, Subject, SubjectKind};

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| (*v).to_owned()).collect()
}

fn policy() -> Policy {
    let deny = vec![
        RuleSpec {
            groups: strings(&["contractors", "interns"]),
            methods: Some(strings(&["DELETE", "PUT"])),
            ..RuleSpec::new("routes[0].deny[0]")
        },
        RuleSpec {
            users: strings(&["mallory@corp.example"]),
            ..RuleSpec::new("routes[0].deny[1]")
        },
        RuleSpec {
            email_domains: strings(&["*.partner.example"]),
            paths: Some(strings(&["/admin", "/billing/"])),
            ..RuleSpec::new("routes[0].deny[2]")
        },
        RuleSpec {
            group_ids: strings(&["00gSUSPENDED"]),
            ..RuleSpec::new("routes[0].deny[3]")
        },
    ];
    let mut allow: Vec<RuleSpec> = (0..12)
        .map(|i| RuleSpec {
            groups: vec![format!("team-{i}"), format!("Team-{i}-Leads")],
            methods: (i % 3 == 0).then(|| strings(&["GET", "HEAD"])),
            paths: (i % 4 == 0).then(|| vec![format!("/teams/{i}")]),
            ..RuleSpec::new(format!("routes[0].allow[{i}]"))
        })
        .collect();
    allow.push(RuleSpec {
        email_domains: strings(&["corp.example", "*.corp.example"]),
        paths: Some(strings(&["/docs"])),
        ..RuleSpec::new("routes[0].allow[12]")
    });
    allow.push(RuleSpec {
        group_ids: strings(&["00gPLATFORM", "00gSECURITY"]),
        ..RuleSpec::new("routes[0].allow[13]")
    });
    allow.push(RuleSpec {
        users: strings(&["root@corp.example", "ops-bot"]),
        ..RuleSpec::new("routes[0].allow[14]")
    });
    allow.push(RuleSpec {
        groups: strings(&["SRE", "Platform Engineering"]),
        ..RuleSpec::new("routes[0].allow[15]")
    });
    match Policy::compile(allow, deny) {
        Ok(policy) => policy,
        Err(errors) => panic!("{errors:?}"),
    }
}

fn bench(c: &mut Criterion) {
    let policy = policy();
    let names: Vec<String> = (0..49).map(|i| format!("Directory Group {i:02}")).collect();
    let ids: Vec<String> = (0..49).map(|i| format!("00g{i:017}")).collect();
    let mut groups: Vec<GroupRef<'_>> = names
        .iter()
        .zip(&ids)
        .map(|(name, id)| GroupRef {
            display_name: name,
            external_id: Some(id),
        })
        .collect();
    // The one that matters, last, so every group is looked at.
    groups.push(GroupRef {
        display_name: "sre",
        external_id: Some("00gSRE"),
    });
    let alice = Subject {
        kind: SubjectKind::Person,
        user_name: "alice@corp.example",
        email: Some("alice@eu.corp.example"),
        active: true,
        groups: &groups,
        owner_groups: &[],
    };
    let outsider = Subject {
        groups: &groups[..49],
        owner_groups: &[],
        ..alice
    };
    let get = Request {
        method: "GET",
        path: "/api/v1/items/42",
    };
    let admin = Request {
        method: "DELETE",
        path: "/admin/users/7",
    };
    let contractor_groups = [GroupRef {
        display_name: "Contractors",
        external_id: None,
    }];
    let contractor = Subject {
        groups: &contractor_groups,
        owner_groups: &[],
        ..alice
    };

    assert!(policy.evaluate(Some(&alice), &get).allowed);
    assert!(!policy.evaluate(Some(&outsider), &get).allowed);
    assert!(!policy.evaluate(Some(&contractor), &admin).allowed);

    let mut group = c.benchmark_group("evaluate");
    group.bench_function("allowed, 20 rules, 50 groups", |b| {
        b.iter(|| policy.evaluate(black_box(Some(&alice)), black_box(&get)))
    });
    group.bench_function("no rule allows, 20 rules, 49 groups", |b| {
        b.iter(|| policy.evaluate(black_box(Some(&outsider)), black_box(&get)))
    });
    group.bench_function("denied, 20 rules, 1 group", |b| {
        b.iter(|| policy.evaluate(black_box(Some(&contractor)), black_box(&admin)))
    });
    group.bench_function("anonymous", |b| {
        b.iter(|| policy.evaluate(black_box(None), black_box(&get)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
