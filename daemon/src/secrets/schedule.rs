//! When rotations run: a `Schedule` parsed once from a cron expression, a cron macro or a
//! `rate(…)`, optionally held to a daily UTC `Window` in which rotations may start. All times
//! are UTC; cron matching is done by the `cron` crate (0.17) on chrono times.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, NaiveTime, TimeDelta, Utc};

/// What every parse error repeats, so the operator sees the forms that would have worked.
const ACCEPTED_FORMS: &str = "accepted forms: a 5-field crontab line `minute hour day-of-month month day-of-week` \
(e.g. `30 2 * * *`, day of week 0-7 with 0 and 7 = Sunday), 6 cron fields with seconds first \
or 7 with a year last (cron crate syntax: day of week 1-7 with 1 = Sunday, or names), \
`@yearly`, `@monthly`, `@weekly`, `@daily`, `@midnight`, `@hourly`, \
or `rate(N unit)` such as `rate(12h)`, `rate(30m)`, `rate(90s)`, `rate(2 hours)`";

/// When a secret rotates, parsed once from its configuration text.
///
/// Forms:
/// - 5 fields, the usual crontab line (`30 2 * * 1` = 02:30 UTC every Monday). It is run at
///   second 0, and its day-of-week numbers (0-7, 0 and 7 = Sunday) are translated to the cron
///   crate's (1-7, 1 = Sunday). Restricting both day of month and day of week is refused:
///   crontab runs on either, the cron crate only on days matching both.
/// - 6 fields (seconds first) or 7 (year last): the cron crate's own syntax, unchanged.
/// - `@yearly`, `@monthly`, `@weekly` (Sunday), `@daily` or `@midnight`, `@hourly`.
/// - `rate(N unit)`: every N seconds/minutes/hours/days/weeks after the previous rotation;
///   units `s m h d w` or their names (`rate(12h)`, `rate(2 hours)`).
#[derive(Clone)]
pub struct Schedule {
    source: String,
    kind: Kind,
    window: Option<Window>,
}

/// A daily UTC window in which rotations may start: `[start, start + duration)` every day.
/// A window may cross midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    start: NaiveTime,
    duration: Duration,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError {
    #[error("the schedule is empty; {ACCEPTED_FORMS}")]
    Empty,
    #[error(
        "`{expression}` has {found} fields, but a cron schedule has 5, 6 or 7; {ACCEPTED_FORMS}"
    )]
    FieldCount { expression: String, found: usize },
    #[error("`{expression}` is not a valid cron schedule: {reason}; {ACCEPTED_FORMS}")]
    Cron { expression: String, reason: String },
    #[error(
        "`{0}` is not a known macro: use @yearly, @monthly, @weekly, @daily, @midnight or @hourly"
    )]
    Macro(String),
    #[error("`{expression}` is not a valid rate: {reason}; {ACCEPTED_FORMS}")]
    Rate { expression: String, reason: String },
    #[error("invalid window: {0}")]
    Window(String),
}

#[derive(Clone)]
enum Kind {
    // Boxed: a parsed cron schedule is several hundred bytes of ordinal sets.
    Cron(Box<cron::Schedule>),
    Rate(Duration),
}

impl Schedule {
    /// Parses `text`; see the type's documentation for the accepted forms.
    pub fn parse(text: &str) -> Result<Schedule, ScheduleError> {
        let source = text.trim();
        if source.is_empty() {
            return Err(ScheduleError::Empty);
        }
        let kind = if let Some(inner) = source
            .strip_prefix("rate(")
            .and_then(|rest| rest.strip_suffix(')'))
        {
            Kind::Rate(parse_rate(inner).map_err(|reason| ScheduleError::Rate {
                expression: source.to_owned(),
                reason,
            })?)
        } else if source.starts_with("rate") {
            return Err(ScheduleError::Rate {
                expression: source.to_owned(),
                reason: "write it as `rate(N unit)` with parentheses".into(),
            });
        } else if source.starts_with('@') {
            let expression = match source {
                "@yearly" | "@annually" => "@yearly",
                "@monthly" => "@monthly",
                "@weekly" => "@weekly",
                "@daily" | "@midnight" => "@daily",
                "@hourly" => "@hourly",
                other => return Err(ScheduleError::Macro(other.to_owned())),
            };
            Kind::Cron(Box::new(parse_cron(source, expression)?))
        } else {
            let fields: Vec<&str> = source.split_whitespace().collect();
            match fields.len() {
                5 => {
                    let expression =
                        crontab_to_cron(&fields).map_err(|reason| ScheduleError::Cron {
                            expression: source.to_owned(),
                            reason,
                        })?;
                    Kind::Cron(Box::new(parse_cron(source, &expression)?))
                }
                6 | 7 => Kind::Cron(Box::new(parse_cron(source, &fields.join(" "))?)),
                found => {
                    return Err(ScheduleError::FieldCount {
                        expression: source.to_owned(),
                        found,
                    });
                }
            }
        };
        Ok(Schedule {
            source: source.to_owned(),
            kind,
            window: None,
        })
    }

    /// The same schedule, with rotations held to `window`.
    pub fn with_window(mut self, window: Window) -> Schedule {
        self.window = Some(window);
        self
    }

    pub fn window(&self) -> Option<Window> {
        self.window
    }

    /// The rotation start that follows `after`: for cron schedules the first matching time
    /// strictly after it, for rates `after + rate`. When a window is set and that time falls
    /// outside it, the start of the next window instead. `None` when the cron expression has
    /// no later time (a year field in the past) or the time is out of chrono's range.
    pub fn next_after(&self, after: SystemTime) -> Option<SystemTime> {
        let after: DateTime<Utc> = after.into();
        let next = match &self.kind {
            Kind::Cron(cron) => cron.after(&after).next()?,
            Kind::Rate(rate) => after.checked_add_signed(TimeDelta::from_std(*rate).ok()?)?,
        };
        let next = match self.window {
            Some(window) => window.earliest_start_from(next)?,
            None => next,
        };
        Some(next.into())
    }

    /// When the next rotation is due, given the last one's start (if any) and the current time.
    ///
    /// A secret that never rotated waits a full period: the next cron time after `now`, or
    /// `now + rate` (so a fresh deployment does not rotate every secret at once). Otherwise
    /// the result is computed from `last_run` and may lie in the past, meaning a rotation was
    /// missed while the daemon was down: the caller runs it at once, and only once, since the
    /// following call starts from that run.
    pub fn next_run(&self, last_run: Option<SystemTime>, now: SystemTime) -> Option<SystemTime> {
        self.next_after(last_run.unwrap_or(now))
    }
}

impl FromStr for Schedule {
    type Err = ScheduleError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Schedule::parse(text)
    }
}

/// The source text, trimmed; the window is not part of it.
impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schedule")
            .field("source", &self.source)
            .field("window", &self.window)
            .finish()
    }
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source && self.window == other.window
    }
}

impl Window {
    /// A window opening at `start` ("HH:MM", UTC) each day and lasting `duration`
    /// (more than zero, at most 24 hours).
    pub fn new(start: &str, duration: Duration) -> Result<Window, ScheduleError> {
        let start = NaiveTime::parse_from_str(start.trim(), "%H:%M").map_err(|_| {
            ScheduleError::Window(format!(
                "start `{start}` is not a UTC time of day written HH:MM (e.g. 02:30)"
            ))
        })?;
        if duration.is_zero() || duration > Duration::from_secs(24 * 3600) {
            return Err(ScheduleError::Window(format!(
                "duration {} must be more than zero and at most 24h",
                humantime::format_duration(duration)
            )));
        }
        Ok(Window { start, duration })
    }

    /// `t` itself when it lies inside a window, else the start of the next window.
    fn earliest_start_from(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let duration = TimeDelta::from_std(self.duration).ok()?;
        let today = t.date_naive().and_time(self.start).and_utc();
        // A window that opened yesterday may still be open (windows can cross midnight).
        let yesterday = today.checked_sub_signed(TimeDelta::days(1))?;
        for opened in [yesterday, today] {
            if opened <= t && t < opened.checked_add_signed(duration)? {
                return Some(t);
            }
        }
        if today > t {
            Some(today)
        } else {
            today.checked_add_signed(TimeDelta::days(1))
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} UTC for {}",
            self.start.format("%H:%M"),
            humantime::format_duration(self.duration)
        )
    }
}

/// The cron crate's schedule for `expression`, with errors naming the operator's `source`.
fn parse_cron(source: &str, expression: &str) -> Result<cron::Schedule, ScheduleError> {
    cron::Schedule::from_str(expression).map_err(|e| {
        // The crate's message repeats the expression with a caret under the bad field, then
        // gives the reason on its last line. For a 5-field line that expression is our
        // normalised 6-field form, whose caret would point at the wrong place: keep the reason.
        let message = e.to_string();
        let reason = message
            .lines()
            .rev()
            .find(|line| !line.trim().is_empty())
            .unwrap_or("invalid expression")
            .trim()
            .trim_end_matches('.')
            .to_owned();
        ScheduleError::Cron {
            expression: source.to_owned(),
            reason,
        }
    })
}

/// `N unit` or `Nunit`, N > 0.
fn parse_rate(inner: &str) -> Result<Duration, String> {
    let inner = inner.trim();
    let digits_end = inner
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(inner.len());
    let (number, unit) = inner.split_at(digits_end);
    if number.is_empty() {
        return Err(format!("`{inner}` does not start with a whole number"));
    }
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{number} is too large"))?;
    if n == 0 {
        return Err("the rate must be more than zero".into());
    }
    let seconds_per_unit = match unit.trim() {
        "s" | "sec" | "secs" | "second" | "seconds" => 1,
        "m" | "min" | "mins" | "minute" | "minutes" => 60,
        "h" | "hr" | "hrs" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86_400,
        "w" | "week" | "weeks" => 7 * 86_400,
        "" => return Err("the unit is missing (s, m, h, d or w)".into()),
        other => {
            return Err(format!(
                "unknown unit `{other}`: use s, m, h, d, w or seconds, minutes, hours, days, weeks"
            ));
        }
    };
    n.checked_mul(seconds_per_unit)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{inner} is too long"))
}

/// A 5-field crontab line as a 6-field cron crate expression: second 0 in front, day-of-week
/// numbers moved to the crate's numbering.
fn crontab_to_cron(fields: &[&str]) -> Result<String, String> {
    let (day_of_month, day_of_week) = (fields[2], fields[4]);
    let unrestricted = |f: &str| f == "*" || f == "?";
    if !unrestricted(day_of_month) && !unrestricted(day_of_week) {
        return Err(format!(
            "both day of month (`{day_of_month}`) and day of week (`{day_of_week}`) are restricted; \
crontab would run on days matching either, this scheduler only on days matching both, \
so restrict one and leave the other `*`"
        ));
    }
    Ok(format!(
        "0 {} {} {} {} {}",
        fields[0],
        fields[1],
        day_of_month,
        fields[3],
        crontab_day_of_week(day_of_week)?
    ))
}

/// Crontab numbers days 0-7 (0 and 7 = Sunday); the cron crate 1-7 (1 = Sunday). Names,
/// `*` and `?` mean the same in both. Steps keep their meaning once the base moves by one.
fn crontab_day_of_week(field: &str) -> Result<String, String> {
    let mut items = Vec::new();
    for item in field.split(',') {
        let (base, step) = match item.split_once('/') {
            Some((base, step)) => (base, Some(step)),
            None => (item, None),
        };
        let base = match base.split_once('-') {
            Some((from_text, to_text)) => {
                let (from, to) = (day_number(from_text)?, day_number(to_text)?);
                match (from, to) {
                    // 0-7 is every day, which is 1-7 in the crate's numbering.
                    (Some(0), Some(7)) => "1-7".to_owned(),
                    // A range ending on Sunday (e.g. 5-7, Friday to Sunday) wraps in the
                    // crate's numbering: split it into the weekdays and Sunday.
                    (Some(a @ 1..=6), Some(7)) => {
                        if step.is_some() {
                            return Err(format!(
                                "day-of-week range `{item}` ends on Sunday (7) and has a step; \
write it with day names or as a list"
                            ));
                        }
                        items.push(format!("{}-7", a + 1));
                        items.push("1".into());
                        continue;
                    }
                    _ => format!(
                        "{}-{}",
                        translate_day(from_text, from),
                        translate_day(to_text, to)
                    ),
                }
            }
            None => translate_day(base, day_number(base)?),
        };
        items.push(match step {
            Some(step) => format!("{base}/{step}"),
            None => base,
        });
    }
    Ok(items.join(","))
}

/// `Some(n)` for a crontab day number, `None` for a name, `*` or `?`.
fn day_number(text: &str) -> Result<Option<u32>, String> {
    if !text.bytes().all(|b| b.is_ascii_digit()) || text.is_empty() {
        return Ok(None);
    }
    match text.parse::<u32>() {
        Ok(n) if n <= 7 => Ok(Some(n)),
        _ => Err(format!(
            "day of week {text} is out of range: crontab numbers days 0-7 (0 and 7 = Sunday)"
        )),
    }
}

fn translate_day(text: &str, number: Option<u32>) -> String {
    match number {
        Some(n) => ((n % 7) + 1).to_string(),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use chrono::TimeZone;

    fn provider() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> SystemTime {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap().into()
    }

    fn next(schedule: &str, after: SystemTime) -> SystemTime {
        Schedule::parse(schedule)
            .unwrap()
            .next_after(after)
            .unwrap()
    }

    #[test]
    fn five_field_crontab_runs_at_second_zero() {
        provider();
        // 2026-03-10 is a Tuesday.
        let t = at(2026, 3, 10, 12, 0, 0);
        assert_eq!(next("30 2 * * *", t), at(2026, 3, 11, 2, 30, 0));
        assert_eq!(next("*/15 * * * *", t), at(2026, 3, 10, 12, 15, 0));
        assert_eq!(next("0 0 1 * *", t), at(2026, 4, 1, 0, 0, 0));
    }

    #[test]
    fn five_field_day_of_week_uses_crontab_numbering() {
        provider();
        let tuesday = at(2026, 3, 10, 12, 0, 0);
        // 1 = Monday in crontab (the cron crate alone would read it as Sunday).
        assert_eq!(next("0 3 * * 1", tuesday), at(2026, 3, 16, 3, 0, 0));
        // 0 and 7 are both Sunday.
        assert_eq!(next("0 3 * * 0", tuesday), at(2026, 3, 15, 3, 0, 0));
        assert_eq!(next("0 3 * * 7", tuesday), at(2026, 3, 15, 3, 0, 0));
        // Monday to Friday, from a Friday evening: the next Monday.
        let friday = at(2026, 3, 13, 20, 0, 0);
        assert_eq!(next("0 3 * * 1-5", friday), at(2026, 3, 16, 3, 0, 0));
        // Friday to Sunday wraps; from a Saturday evening, the Sunday.
        let saturday = at(2026, 3, 14, 20, 0, 0);
        assert_eq!(next("0 3 * * 5-7", saturday), at(2026, 3, 15, 3, 0, 0));
        assert_eq!(next("0 3 * * mon", tuesday), at(2026, 3, 16, 3, 0, 0));
    }

    #[test]
    fn six_and_seven_fields_are_the_cron_crates_syntax() {
        provider();
        let t = at(2026, 3, 10, 12, 0, 0);
        assert_eq!(next("15 30 2 * * *", t), at(2026, 3, 11, 2, 30, 15));
        assert_eq!(next("0 0 4 1 1 * 2028", t), at(2028, 1, 1, 4, 0, 0));
        // A year in the past has no next time.
        let past = Schedule::parse("0 0 4 1 1 * 2020").unwrap();
        assert_eq!(past.next_after(t), None);
    }

    #[test]
    fn macros() {
        provider();
        let t = at(2026, 3, 10, 12, 30, 0);
        assert_eq!(next("@hourly", t), at(2026, 3, 10, 13, 0, 0));
        assert_eq!(next("@daily", t), at(2026, 3, 11, 0, 0, 0));
        assert_eq!(next("@midnight", t), at(2026, 3, 11, 0, 0, 0));
        assert_eq!(next("@weekly", t), at(2026, 3, 15, 0, 0, 0));
        assert_eq!(next("@monthly", t), at(2026, 4, 1, 0, 0, 0));
        assert_eq!(next("@yearly", t), at(2027, 1, 1, 0, 0, 0));
    }

    #[test]
    fn rate_forms() {
        provider();
        let t = at(2026, 3, 10, 12, 0, 0);
        let hours_12 = at(2026, 3, 11, 0, 0, 0);
        assert_eq!(next("rate(12h)", t), hours_12);
        assert_eq!(next("rate(12 hours)", t), hours_12);
        assert_eq!(next("rate(30m)", t), at(2026, 3, 10, 12, 30, 0));
        assert_eq!(next("rate(90s)", t), at(2026, 3, 10, 12, 1, 30));
        assert_eq!(next("rate(2 hours)", t), at(2026, 3, 10, 14, 0, 0));
        assert_eq!(next("rate(1 day)", t), at(2026, 3, 11, 12, 0, 0));
        assert_eq!(next("rate(1w)", t), at(2026, 3, 17, 12, 0, 0));
    }

    #[test]
    fn next_run_waits_a_period_first_and_catches_up_once() {
        provider();
        let now = at(2026, 3, 10, 12, 0, 0);
        let rate = Schedule::parse("rate(1h)").unwrap();
        assert_eq!(rate.next_run(None, now), Some(at(2026, 3, 10, 13, 0, 0)));
        let long_ago = at(2026, 3, 1, 0, 0, 0);
        assert_eq!(
            rate.next_run(Some(long_ago), now),
            Some(at(2026, 3, 1, 1, 0, 0))
        );
        let cron = Schedule::parse("@daily").unwrap();
        assert_eq!(cron.next_run(None, now), Some(at(2026, 3, 11, 0, 0, 0)));
        assert_eq!(
            cron.next_run(Some(long_ago), now),
            Some(at(2026, 3, 2, 0, 0, 0))
        );
    }

    #[test]
    fn bad_expressions_say_what_is_wrong() {
        provider();
        let err = |s: &str| Schedule::parse(s).unwrap_err().to_string();

        let e = err("* * * *");
        assert!(e.contains("has 4 fields"), "{e}");
        assert!(e.contains("accepted forms"), "{e}");
        assert!(err("1 2 3 4 5 6 7 8").contains("has 8 fields"));

        let e = err("61 * * * *");
        assert!(
            e.contains("`61 * * * *` is not a valid cron schedule"),
            "{e}"
        );
        assert!(e.contains("Minutes") && e.contains("'61' specified"), "{e}");
        assert!(!e.contains('\n'), "{e}");

        let e = err("rate(0m)");
        assert!(e.contains("more than zero"), "{e}");
        let e = err("rate(abc)");
        assert!(e.contains("`rate(abc)` is not a valid rate"), "{e}");
        assert!(e.contains("whole number"), "{e}");
        assert!(err("rate(5 fortnights)").contains("unknown unit `fortnights`"));
        assert!(err("rate(5)").contains("unit is missing"));
        assert!(err("rate 5m").contains("parentheses"));

        assert!(err("@sometimes").contains("not a known macro"));
        assert!(err("   ").contains("empty"));
        assert!(err("0 3 * * 8").contains("out of range"));
        assert!(err("0 3 1 * 1").contains("restrict one"));
        assert!(matches!(
            Schedule::parse("0 0 * * * * 1990 1"),
            Err(ScheduleError::FieldCount { found: 8, .. })
        ));
    }

    #[test]
    fn window_moves_times_outside_it_to_the_next_start() {
        provider();
        let window = Window::new("02:00", Duration::from_secs(2 * 3600)).unwrap();
        let hourly = Schedule::parse("@hourly").unwrap().with_window(window);
        // 12:10 → 13:00 is outside 02:00-04:00: the next day's 02:00.
        assert_eq!(
            hourly.next_after(at(2026, 3, 10, 12, 10, 0)),
            Some(at(2026, 3, 11, 2, 0, 0))
        );
        // 01:10 → 02:00 is inside: unchanged.
        assert_eq!(
            hourly.next_after(at(2026, 3, 10, 1, 10, 0)),
            Some(at(2026, 3, 10, 2, 0, 0))
        );
        // 03:10 → 04:00 is the window's end, which is outside: the next day's 02:00.
        assert_eq!(
            hourly.next_after(at(2026, 3, 10, 3, 10, 0)),
            Some(at(2026, 3, 11, 2, 0, 0))
        );
        // A rate landing before today's window moves to today's start.
        let rate = Schedule::parse("rate(30m)").unwrap().with_window(window);
        assert_eq!(
            rate.next_after(at(2026, 3, 10, 0, 0, 0)),
            Some(at(2026, 3, 10, 2, 0, 0))
        );
    }

    #[test]
    fn window_crossing_midnight() {
        provider();
        let window = Window::new("23:00", Duration::from_secs(3 * 3600)).unwrap();
        let rate = Schedule::parse("rate(1h)").unwrap().with_window(window);
        // 00:30 is inside the window that opened at 23:00 the day before.
        assert_eq!(
            rate.next_after(at(2026, 3, 10, 23, 30, 0)),
            Some(at(2026, 3, 11, 0, 30, 0))
        );
        // 02:00 is the end: moved to 23:00 the same day.
        assert_eq!(
            rate.next_after(at(2026, 3, 11, 1, 0, 0)),
            Some(at(2026, 3, 11, 23, 0, 0))
        );
    }

    #[test]
    fn bad_windows_are_rejected() {
        provider();
        assert!(Window::new("25:00", Duration::from_secs(60)).is_err());
        assert!(Window::new("2am", Duration::from_secs(60)).is_err());
        assert!(Window::new("02:00", Duration::ZERO).is_err());
        assert!(Window::new("02:00", Duration::from_secs(25 * 3600)).is_err());
        let full_day = Window::new("00:00", Duration::from_secs(24 * 3600)).unwrap();
        let t = at(2026, 3, 10, 12, 0, 0);
        assert_eq!(
            Schedule::parse("rate(1s)")
                .unwrap()
                .with_window(full_day)
                .next_after(t),
            Some(at(2026, 3, 10, 12, 0, 1))
        );
    }

    #[test]
    fn display_round_trips() {
        provider();
        for text in [
            "30 2 * * 1-5",
            "15 30 2 * * *",
            "0 0 4 1 1 * 2028",
            "@midnight",
            "@weekly",
            "rate(12h)",
            "rate(2 hours)",
        ] {
            let schedule = Schedule::parse(text).unwrap();
            assert_eq!(schedule.to_string(), text);
            assert_eq!(Schedule::parse(&schedule.to_string()).unwrap(), schedule);
        }
        assert_eq!(Schedule::parse("  @daily ").unwrap().to_string(), "@daily");
        let window = Window::new("02:30", Duration::from_secs(5400)).unwrap();
        assert_eq!(window.to_string(), "02:30 UTC for 1h 30m");
    }
}
