//! The routing rules, case by case.

use std::time::Duration;

use super::*;

const ALL_CLOUD: [CloudState; 3] = [
    CloudState::Disabled,
    CloudState::Offline,
    CloudState::Online,
];

fn req(route: Route) -> RouteRequest {
    RouteRequest {
        route,
        private: false,
        defer: false,
        fit: LocalFit::Fits { prompt_tokens: 10 },
        max_tokens: 100,
        deadline: None,
        complexity: 0.0,
        expert: false,
        long_context: false,
    }
}

fn at(cloud: CloudState) -> Situation {
    Situation {
        cloud,
        local_admits: true,
        prefer_cloud: false,
        local_speed: Some(LocalSpeed {
            ttft: Duration::from_millis(100),
            tokens_per_s: 10.0,
        }),
        complexity_threshold: 0.6,
        fallback_to_local: true,
    }
}

fn cloud(reason: Reason) -> Decision {
    Decision::Cloud {
        reason,
        fallback: true,
    }
}

fn refused(d: Decision) -> Refusal {
    match d {
        Decision::Refuse(r) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn private_requests_stay_local_whatever_else_they_ask() {
    for c in ALL_CLOUD {
        for route in [Route::Auto, Route::Local, Route::Cloud] {
            let r = RouteRequest {
                private: true,
                defer: true,
                complexity: 1.0,
                expert: true,
                long_context: true,
                fit: LocalFit::TooLong {
                    prompt_tokens: 9000,
                    context: 2048,
                },
                deadline: Some(Duration::from_millis(1)),
                ..req(route)
            };
            let mut s = at(c);
            s.local_admits = false;
            assert_eq!(
                decide(&r, &s),
                Decision::Local(Reason::Private),
                "{route:?} {c:?}"
            );
        }
    }
}

#[test]
fn local_route_is_local_even_when_complex() {
    let r = RouteRequest {
        complexity: 1.0,
        ..req(Route::Local)
    };
    assert_eq!(
        decide(&r, &at(CloudState::Online)),
        Decision::Local(Reason::Requested)
    );
}

#[test]
fn cloud_route_goes_to_the_cloud_when_online_without_fallback() {
    assert_eq!(
        decide(&req(Route::Cloud), &at(CloudState::Online)),
        Decision::Cloud {
            reason: Reason::Requested,
            fallback: false
        }
    );
}

#[test]
fn cloud_route_offline_defers_only_when_allowed() {
    let r = RouteRequest {
        defer: true,
        ..req(Route::Cloud)
    };
    assert_eq!(
        decide(&r, &at(CloudState::Offline)),
        Decision::Defer(Reason::Requested)
    );
    assert_eq!(
        refused(decide(&req(Route::Cloud), &at(CloudState::Offline))),
        Refusal::CloudOffline
    );
}

#[test]
fn cloud_route_without_a_cloud_is_refused_even_when_deferrable() {
    let r = RouteRequest {
        defer: true,
        ..req(Route::Cloud)
    };
    assert_eq!(
        refused(decide(&r, &at(CloudState::Disabled))),
        Refusal::NoCloud
    );
}

#[test]
fn auto_simple_tasks_run_locally() {
    for c in ALL_CLOUD {
        assert_eq!(
            decide(&req(Route::Auto), &at(c)),
            Decision::Local(Reason::Simple)
        );
    }
}

#[test]
fn auto_too_long_goes_to_the_cloud_without_fallback() {
    let r = RouteRequest {
        fit: LocalFit::TooLong {
            prompt_tokens: 3000,
            context: 2048,
        },
        ..req(Route::Auto)
    };
    assert_eq!(
        decide(&r, &at(CloudState::Online)),
        Decision::Cloud {
            reason: Reason::TooLong,
            fallback: false
        }
    );
    assert_eq!(
        refused(decide(&r, &at(CloudState::Offline))),
        Refusal::TooLongForBoard {
            prompt_tokens: 3000,
            context: 2048,
            cloud: CloudState::Offline
        }
    );
    assert_eq!(
        refused(decide(&r, &at(CloudState::Disabled))),
        Refusal::TooLongForBoard {
            prompt_tokens: 3000,
            context: 2048,
            cloud: CloudState::Disabled
        }
    );
    let deferrable = RouteRequest { defer: true, ..r };
    assert_eq!(
        decide(&deferrable, &at(CloudState::Offline)),
        Decision::Defer(Reason::TooLong)
    );
}

#[test]
fn auto_complex_goes_to_the_cloud_at_the_threshold() {
    let r = RouteRequest {
        complexity: 0.6,
        ..req(Route::Auto)
    };
    assert_eq!(decide(&r, &at(CloudState::Online)), cloud(Reason::Complex));
    let below = RouteRequest {
        complexity: 0.59,
        ..req(Route::Auto)
    };
    assert_eq!(
        decide(&below, &at(CloudState::Online)),
        Decision::Local(Reason::Simple)
    );
}

#[test]
fn auto_complex_offline_runs_locally_or_defers() {
    let r = RouteRequest {
        complexity: 0.9,
        ..req(Route::Auto)
    };
    assert_eq!(
        decide(&r, &at(CloudState::Offline)),
        Decision::Local(Reason::CloudOffline)
    );
    assert_eq!(
        decide(&r, &at(CloudState::Disabled)),
        Decision::Local(Reason::CloudOffline)
    );
    let deferrable = RouteRequest { defer: true, ..r };
    assert_eq!(
        decide(&deferrable, &at(CloudState::Offline)),
        Decision::Defer(Reason::Complex)
    );
}

#[test]
fn auto_deadline_the_local_model_cannot_meet_goes_to_the_cloud() {
    // 100 ms + 99 tokens at 10 tok/s ≈ 10 s.
    let r = RouteRequest {
        deadline: Some(Duration::from_secs(5)),
        ..req(Route::Auto)
    };
    assert_eq!(decide(&r, &at(CloudState::Online)), cloud(Reason::Deadline));
    let roomy = RouteRequest {
        deadline: Some(Duration::from_secs(20)),
        ..req(Route::Auto)
    };
    assert_eq!(
        decide(&roomy, &at(CloudState::Online)),
        Decision::Local(Reason::Simple)
    );
}

#[test]
fn without_a_speed_measurement_a_deadline_does_not_route() {
    let r = RouteRequest {
        deadline: Some(Duration::from_millis(1)),
        ..req(Route::Auto)
    };
    let mut s = at(CloudState::Online);
    s.local_speed = None;
    assert_eq!(decide(&r, &s), Decision::Local(Reason::Simple));
}

#[test]
fn auto_goes_to_the_cloud_when_the_board_is_busy() {
    let mut s = at(CloudState::Online);
    s.local_admits = false;
    assert_eq!(decide(&req(Route::Auto), &s), cloud(Reason::BoardBusy));
    s.cloud = CloudState::Offline;
    assert_eq!(
        decide(&req(Route::Auto), &s),
        Decision::Local(Reason::CloudOffline)
    );
}

#[test]
fn auto_goes_to_the_cloud_on_a_low_battery_and_stays_local_when_offline() {
    let mut s = at(CloudState::Online);
    s.prefer_cloud = true;
    assert_eq!(decide(&req(Route::Auto), &s), cloud(Reason::LowBattery));
    let private = RouteRequest {
        private: true,
        ..req(Route::Auto)
    };
    assert_eq!(decide(&private, &s), Decision::Local(Reason::Private));
    assert_eq!(
        decide(&req(Route::Local), &s),
        Decision::Local(Reason::Requested)
    );
    s.cloud = CloudState::Offline;
    assert_eq!(
        decide(&req(Route::Auto), &s),
        Decision::Local(Reason::CloudOffline)
    );
}

#[test]
fn fallback_follows_the_configuration() {
    let r = RouteRequest {
        complexity: 1.0,
        ..req(Route::Auto)
    };
    let mut s = at(CloudState::Online);
    s.fallback_to_local = false;
    assert_eq!(
        decide(&r, &s),
        Decision::Cloud {
            reason: Reason::Complex,
            fallback: false
        }
    );
}

#[test]
fn the_estimate_counts_ttft_and_decode() {
    let sp = LocalSpeed {
        ttft: Duration::from_millis(200),
        tokens_per_s: 20.0,
    };
    assert_eq!(sp.estimate(1), Duration::from_millis(200));
    assert_eq!(sp.estimate(21), Duration::from_millis(1200));
}

/// The plan's rule: more than about 10,000 characters of context go to the cloud.
#[test]
fn a_long_context_goes_to_the_cloud_when_online_and_stays_private_when_private() {
    let r = RouteRequest {
        long_context: true,
        ..req(Route::Auto)
    };
    assert_eq!(
        decide(&r, &at(CloudState::Online)),
        cloud(Reason::LongContext)
    );
    assert_eq!(
        decide(&r, &at(CloudState::Offline)),
        Decision::Local(Reason::CloudOffline)
    );
    let private = RouteRequest { private: true, ..r };
    assert_eq!(
        decide(&private, &at(CloudState::Online)),
        Decision::Local(Reason::Private)
    );
}

/// The plan's rule: validation and expert words are expert work, sent to the cloud when allowed, and run
/// locally (saying why) when private or offline.
#[test]
fn expert_work_goes_to_the_cloud_when_allowed_and_says_why_when_it_stays() {
    let r = RouteRequest {
        expert: true,
        ..req(Route::Auto)
    };
    let mut high = at(CloudState::Online);
    high.complexity_threshold = 2.0;
    assert_eq!(
        decide(&r, &high),
        cloud(Reason::Expert),
        "whatever the threshold"
    );
    assert_eq!(
        decide(&r, &at(CloudState::Offline)),
        Decision::Local(Reason::CloudOffline)
    );
    assert_eq!(
        decide(&RouteRequest { defer: true, ..r }, &at(CloudState::Offline)),
        Decision::Defer(Reason::Expert)
    );
    assert_eq!(
        decide(
            &RouteRequest { private: true, ..r },
            &at(CloudState::Online)
        ),
        Decision::Local(Reason::Private)
    );
}
