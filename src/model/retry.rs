//! When to try a failed delivery again.
//!
//! Three sources decide the delay before the next attempt, and the caller should consult them in
//! this order (§5.3 **[INFER]**): a delay the destination asked for in its response headers
//! ([`retry_after`]), then the publisher's `Upstash-Retry-Delay` expression ([`RetryDelayExpr`]),
//! then the default exponential backoff ([`default_backoff`]). Every delay is capped at
//! [`MAX_RETRY_DELAY`] (1 day).
//!
//! Design choice: the expression language is parsed once, at publish time, by a small hand-written
//! recursive-descent parser into an AST, so a malformed header is refused with a precise 400 and
//! each retry only evaluates a tree (nothing untrusted is ever "run"). Parsing is bounded: the
//! input length and the nesting depth are capped, so hostile input cannot overflow the stack.
//! Evaluation uses `f64`; any non-finite intermediate value (division by zero, overflow, `sqrt` of
//! a negative) is an error rather than a silently huge or zero delay, and the caller falls back to
//! its default backoff. Everything here is pure — the current time is a parameter — and nothing
//! panics, whatever the input.

use std::collections::BTreeMap;
use std::iter::Peekable;
use std::time::{Duration, UNIX_EPOCH};

/// Seconds in a day, the cap of every retry delay.
const SECONDS_PER_DAY: u64 = 24 * 60 * 60;

/// The longest delay before a retry (1 day); longer requests are capped or ignored.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(SECONDS_PER_DAY);

/// Growth rate of the default backoff: retry `n` waits `e^(2.5·n)` seconds (§5.2).
const BACKOFF_EXPONENT_PER_RETRY: f64 = 2.5;

/// Longest accepted `Upstash-Retry-Delay` expression, in characters.
const MAX_EXPRESSION_CHARS: usize = 1024;

/// Deepest accepted nesting of parentheses, function calls and unary minus in an expression.
const MAX_NESTING_DEPTH: usize = 64;

/// The only variable of the expression language: retries done so far.
const VARIABLE_RETRIED: &str = "retried";

/// What may start an operand; used in "expected …" parse errors.
const EXPECTED_OPERAND: &str = "a number, 'retried', a function call or '('";

/// Response headers through which a destination can ask for a delay (§3.2), lower case.
const RETRY_AFTER_HEADERS: [&str; 4] = [
    "retry-after",
    "x-ratelimit-reset",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
];

/// A plain integer at least this large in a retry-after header is a unix timestamp in seconds
/// (2001-09-09), not a number of seconds to wait (that would be over 31 years).
const UNIX_TIMESTAMP_THRESHOLD_SECS: u64 = 1_000_000_000;

const NANOS_PER_MILLI: f64 = 1_000_000.0;
const NANOS_PER_SECOND: u128 = 1_000_000_000;
const MILLIS_PER_SECOND: i128 = 1_000;
const MILLIS_PER_DAY: f64 = (SECONDS_PER_DAY * 1_000) as f64;

/// Fraction digits of a duration component that are kept; later digits are below a nanosecond
/// even for hours, and dropping them keeps the arithmetic far from overflow.
const MAX_FRACTION_DIGITS: usize = 18;

/// Go duration units and their length in nanoseconds. Both the micro sign (U+00B5) and the Greek
/// small letter mu (U+03BC) are accepted for microseconds, as in Go.
const GO_DURATION_UNITS: [(&str, u128); 8] = [
    ("ns", 1),
    ("us", 1_000),
    ("\u{b5}s", 1_000),
    ("\u{3bc}s", 1_000),
    ("ms", 1_000_000),
    ("s", NANOS_PER_SECOND),
    ("m", 60 * NANOS_PER_SECOND),
    ("h", 60 * 60 * NANOS_PER_SECOND),
];

/// The units listed in Go duration error messages.
const GO_DURATION_UNIT_LIST: &str = "ns, us, µs, ms, s, m or h";

/// Default backoff before retry number `n` (1 for the first retry): min(86400, e^(2.5·n)) seconds.
///
/// That is about 12 s, 2 m 28 s, 30 m 8 s, 6 h 7 m, then 1 day for every later retry.
pub fn default_backoff(n: u32) -> Duration {
    let seconds = (BACKOFF_EXPONENT_PER_RETRY * f64::from(n)).exp();
    capped_from_millis(seconds * 1_000.0)
}

/// A delay in (possibly fractional, negative or non-finite) milliseconds as a [`Duration`]:
/// negative and NaN become zero, anything from 1 day up becomes [`MAX_RETRY_DELAY`].
fn capped_from_millis(millis: f64) -> Duration {
    if millis.is_nan() || millis <= 0.0 {
        Duration::ZERO
    } else if millis >= MILLIS_PER_DAY {
        MAX_RETRY_DELAY
    } else {
        // Below 8.64e13 ns, so the conversion is exact for whole milliseconds and cannot overflow.
        Duration::from_nanos((millis * NANOS_PER_MILLI).round() as u64)
    }
}

/// Why an `Upstash-Retry-Delay` expression was refused, or could not be evaluated.
///
/// The text is shown to API clients in a 400. Positions count characters from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetryDelayError {
    /// The expression is empty or only whitespace.
    #[error("empty expression")]
    Empty,
    /// The expression is longer than the accepted maximum.
    #[error("expression is longer than {max} characters")]
    TooLong {
        /// The maximum length in characters.
        max: usize,
    },
    /// Parentheses, function calls or unary minus are nested too deeply.
    #[error("expression is nested more than {max} levels deep at position {position}")]
    TooDeep {
        /// The maximum nesting depth.
        max: usize,
        /// Where the limit was exceeded.
        position: usize,
    },
    /// A character that cannot start any token.
    #[error("unexpected character '{found}' at position {position}")]
    InvalidCharacter {
        /// The character.
        found: char,
        /// Where it is.
        position: usize,
    },
    /// A run of digits and dots that is not a number (`1.2.3`).
    #[error("invalid number '{text}' at position {position}")]
    InvalidNumber {
        /// The text of the would-be number.
        text: String,
        /// Where it starts.
        position: usize,
    },
    /// A name followed by `(` that is not one of the functions.
    #[error(
        "unknown function '{name}' at position {position} \
         (known: pow, exp, sqrt, abs, floor, ceil, round, min, max)"
    )]
    UnknownFunction {
        /// The name.
        name: String,
        /// Where it starts.
        position: usize,
    },
    /// A name not followed by `(` that is not `retried`.
    #[error("unknown variable '{name}' at position {position} (the only variable is 'retried')")]
    UnknownVariable {
        /// The name.
        name: String,
        /// Where it starts.
        position: usize,
    },
    /// A function name used without an argument list.
    #[error("function '{name}' at position {position} must be called as {usage}")]
    FunctionWithoutCall {
        /// The function name.
        name: &'static str,
        /// Where it starts.
        position: usize,
        /// How to call it, e.g. `pow(x, y)`.
        usage: &'static str,
    },
    /// A function called with the wrong number of arguments.
    #[error(
        "function '{name}' at position {position} takes {expected} {}, got {found} \
         (usage: {usage})",
        argument_noun(.expected)
    )]
    WrongArity {
        /// The function name.
        name: &'static str,
        /// Where it starts.
        position: usize,
        /// How many arguments it takes.
        expected: usize,
        /// How many it was given.
        found: usize,
        /// How to call it, e.g. `pow(x, y)`.
        usage: &'static str,
    },
    /// A token where something else was required.
    #[error("unexpected '{found}' at position {position}, expected {expected}")]
    UnexpectedToken {
        /// The token's text.
        found: String,
        /// Where it starts.
        position: usize,
        /// What would have been accepted.
        expected: String,
    },
    /// The input ended where more was required.
    #[error("unexpected end of expression, expected {expected}")]
    UnexpectedEnd {
        /// What would have been accepted.
        expected: String,
    },
    /// Evaluation divided by zero.
    #[error("division by zero (retried = {retried})")]
    DivisionByZero {
        /// The value of `retried` in that evaluation.
        retried: u32,
    },
    /// Evaluation produced an infinite or NaN value (overflow, `sqrt` of a negative number).
    #[error("result is not a finite number (retried = {retried})")]
    NotFinite {
        /// The value of `retried` in that evaluation.
        retried: u32,
    },
}

fn argument_noun(count: &usize) -> &'static str {
    if *count == 1 {
        "argument"
    } else {
        "arguments"
    }
}

/// A parsed `Upstash-Retry-Delay` expression. Result unit: milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryDelayExpr {
    source: String,
    ast: Expr,
}

impl RetryDelayExpr {
    /// Parses; the error text is shown to API clients in a 400.
    pub fn parse(source: &str) -> Result<Self, RetryDelayError> {
        if source.chars().nth(MAX_EXPRESSION_CHARS).is_some() {
            return Err(RetryDelayError::TooLong {
                max: MAX_EXPRESSION_CHARS,
            });
        }
        let tokens = tokenize(source)?;
        if tokens.is_empty() {
            return Err(RetryDelayError::Empty);
        }
        let mut parser = Parser {
            tokens,
            next: 0,
            depth: 0,
        };
        let ast = parser.expression()?;
        if let Some(token) = parser.peek() {
            return Err(token.unexpected("an operator or the end of the expression"));
        }
        Ok(Self {
            source: source.to_owned(),
            ast,
        })
    }

    /// The expression text exactly as given (it is echoed back as `retryDelayExpression`).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates with `retried` = retries done so far (0 before the first retry).
    ///
    /// Non-finite results (division by zero, overflow) are an error; negative results clamp to
    /// 0; results are capped at [`MAX_RETRY_DELAY`] (1 day).
    pub fn eval(&self, retried: u32) -> Result<Duration, RetryDelayError> {
        self.ast.evaluate(retried).map(capped_from_millis)
    }
}

/// Operators and functions of one argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UnaryOp {
    Neg,
    Exp,
    Sqrt,
    Abs,
    Floor,
    Ceil,
    Round,
}

impl UnaryOp {
    fn apply(self, x: f64) -> f64 {
        match self {
            Self::Neg => -x,
            Self::Exp => x.exp(),
            Self::Sqrt => x.sqrt(),
            Self::Abs => x.abs(),
            Self::Floor => x.floor(),
            Self::Ceil => x.ceil(),
            // Halves round away from zero.
            Self::Round => x.round(),
        }
    }
}

/// Operators and functions of two arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Min,
    Max,
}

impl BinaryOp {
    fn apply(self, x: f64, y: f64) -> f64 {
        match self {
            Self::Add => x + y,
            Self::Sub => x - y,
            Self::Mul => x * y,
            Self::Div => x / y,
            Self::Pow => x.powf(y),
            Self::Min => x.min(y),
            Self::Max => x.max(y),
        }
    }
}

/// A function of the expression language.
#[derive(Debug, Clone, Copy)]
enum Function {
    Unary(UnaryOp),
    Binary(BinaryOp),
}

/// Every function: name, meaning and usage shown in errors.
const FUNCTIONS: [(&str, Function, &str); 9] = [
    ("pow", Function::Binary(BinaryOp::Pow), "pow(x, y)"),
    ("exp", Function::Unary(UnaryOp::Exp), "exp(x)"),
    ("sqrt", Function::Unary(UnaryOp::Sqrt), "sqrt(x)"),
    ("abs", Function::Unary(UnaryOp::Abs), "abs(x)"),
    ("floor", Function::Unary(UnaryOp::Floor), "floor(x)"),
    ("ceil", Function::Unary(UnaryOp::Ceil), "ceil(x)"),
    ("round", Function::Unary(UnaryOp::Round), "round(x)"),
    ("min", Function::Binary(BinaryOp::Min), "min(x, y)"),
    ("max", Function::Binary(BinaryOp::Max), "max(x, y)"),
];

/// The syntax tree. Functions are folded into the operators, so arity is checked once, when
/// parsing, and evaluation never indexes an argument list.
#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Number(f64),
    Retried,
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
}

impl Expr {
    /// The value in milliseconds; recursion depth is bounded by the token count, itself bounded
    /// by [`MAX_EXPRESSION_CHARS`].
    fn evaluate(&self, retried: u32) -> Result<f64, RetryDelayError> {
        let value = match self {
            Self::Number(value) => *value,
            Self::Retried => f64::from(retried),
            Self::Unary(op, x) => op.apply(x.evaluate(retried)?),
            Self::Binary(op, x, y) => {
                let x = x.evaluate(retried)?;
                let y = y.evaluate(retried)?;
                if *op == BinaryOp::Div && y == 0.0 {
                    return Err(RetryDelayError::DivisionByZero { retried });
                }
                op.apply(x, y)
            }
        };
        if value.is_finite() {
            Ok(value)
        } else {
            Err(RetryDelayError::NotFinite { retried })
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum TokenKind {
    Number(f64),
    Name,
    Plus,
    Minus,
    Star,
    Slash,
    Open,
    Close,
    Comma,
}

#[derive(Debug, Clone, Copy)]
struct Token<'a> {
    kind: TokenKind,
    text: &'a str,
    /// 1-based character position of the token's first character.
    position: usize,
}

impl Token<'_> {
    fn unexpected(&self, expected: &str) -> RetryDelayError {
        RetryDelayError::UnexpectedToken {
            found: self.text.to_owned(),
            position: self.position,
            expected: expected.to_owned(),
        }
    }
}

/// Splits the source into tokens, dropping whitespace.
fn tokenize(source: &str) -> Result<Vec<Token<'_>>, RetryDelayError> {
    let mut tokens = Vec::new();
    let mut chars = source.char_indices().enumerate().peekable();
    while let Some((index, (start, c))) = chars.next() {
        let position = index + 1;
        if c.is_whitespace() {
            continue;
        }
        let (kind, text) = if let Some(kind) = punctuation(c) {
            let text = source.get(start..start + c.len_utf8()).unwrap_or_default();
            (kind, text)
        } else if is_number_char(c) {
            let text = take_run(source, start, &mut chars, is_number_char);
            let value = parse_number(text).ok_or_else(|| RetryDelayError::InvalidNumber {
                text: text.to_owned(),
                position,
            })?;
            (TokenKind::Number(value), text)
        } else if c.is_ascii_alphabetic() || c == '_' {
            let text = take_run(source, start, &mut chars, is_name_char);
            (TokenKind::Name, text)
        } else {
            return Err(RetryDelayError::InvalidCharacter { found: c, position });
        };
        tokens.push(Token {
            kind,
            text,
            position,
        });
    }
    Ok(tokens)
}

fn punctuation(c: char) -> Option<TokenKind> {
    Some(match c {
        '+' => TokenKind::Plus,
        '-' => TokenKind::Minus,
        '*' => TokenKind::Star,
        '/' => TokenKind::Slash,
        '(' => TokenKind::Open,
        ')' => TokenKind::Close,
        ',' => TokenKind::Comma,
        _ => return None,
    })
}

fn is_number_char(c: char) -> bool {
    c.is_ascii_digit() || c == '.'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The token starting at byte `start` (already consumed) and continuing while `accept` holds.
fn take_run<'a, I>(
    source: &'a str,
    start: usize,
    chars: &mut Peekable<I>,
    accept: fn(char) -> bool,
) -> &'a str
where
    I: Iterator<Item = (usize, (usize, char))>,
{
    while chars.next_if(|(_, (_, c))| accept(*c)).is_some() {}
    let end = chars.peek().map_or(source.len(), |(_, (end, _))| *end);
    source.get(start..end).unwrap_or_default()
}

/// A run of digits with at most one dot and at least one digit (`1`, `1.5`, `.5`, `5.`).
fn parse_number(text: &str) -> Option<f64> {
    let dots = text.chars().filter(|c| *c == '.').count();
    if dots > 1 || !text.chars().any(|c| c.is_ascii_digit()) {
        return None;
    }
    text.parse::<f64>().ok().filter(|value| value.is_finite())
}

/// Recursive descent over the grammar
/// `expr := term (('+'|'-') term)*`, `term := unary (('*'|'/') unary)*`,
/// `unary := '-' unary | primary`,
/// `primary := number | 'retried' | name '(' [expr (',' expr)*] ')' | '(' expr ')'`.
struct Parser<'a> {
    tokens: Vec<Token<'a>>,
    next: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<Token<'a>> {
        self.tokens.get(self.next).copied()
    }

    fn bump(&mut self) -> Option<Token<'a>> {
        let token = self.peek();
        if token.is_some() {
            self.next += 1;
        }
        token
    }

    /// Consumes the next token if `select` maps its kind to an operator.
    fn operator(&mut self, select: fn(TokenKind) -> Option<BinaryOp>) -> Option<BinaryOp> {
        let op = self.peek().and_then(|token| select(token.kind));
        if op.is_some() {
            self.next += 1;
        }
        op
    }

    /// Runs `parse` one nesting level deeper, refusing to go past [`MAX_NESTING_DEPTH`].
    fn nested<T>(
        &mut self,
        position: usize,
        parse: impl FnOnce(&mut Self) -> Result<T, RetryDelayError>,
    ) -> Result<T, RetryDelayError> {
        if self.depth >= MAX_NESTING_DEPTH {
            return Err(RetryDelayError::TooDeep {
                max: MAX_NESTING_DEPTH,
                position,
            });
        }
        self.depth += 1;
        let result = parse(self);
        self.depth -= 1;
        result
    }

    fn expression(&mut self) -> Result<Expr, RetryDelayError> {
        let mut left = self.term()?;
        while let Some(op) = self.operator(|kind| match kind {
            TokenKind::Plus => Some(BinaryOp::Add),
            TokenKind::Minus => Some(BinaryOp::Sub),
            _ => None,
        }) {
            let right = self.term()?;
            left = Expr::Binary(op, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn term(&mut self) -> Result<Expr, RetryDelayError> {
        let mut left = self.unary()?;
        while let Some(op) = self.operator(|kind| match kind {
            TokenKind::Star => Some(BinaryOp::Mul),
            TokenKind::Slash => Some(BinaryOp::Div),
            _ => None,
        }) {
            let right = self.unary()?;
            left = Expr::Binary(op, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, RetryDelayError> {
        match self.peek() {
            Some(minus) if minus.kind == TokenKind::Minus => {
                self.next += 1;
                let operand = self.nested(minus.position, Self::unary)?;
                Ok(Expr::Unary(UnaryOp::Neg, Box::new(operand)))
            }
            _ => self.primary(),
        }
    }

    fn primary(&mut self) -> Result<Expr, RetryDelayError> {
        let Some(token) = self.bump() else {
            return Err(RetryDelayError::UnexpectedEnd {
                expected: EXPECTED_OPERAND.to_owned(),
            });
        };
        match token.kind {
            TokenKind::Number(value) => Ok(Expr::Number(value)),
            TokenKind::Name => self.name(token),
            TokenKind::Open => self.nested(token.position, |parser| {
                let inner = parser.expression()?;
                match parser.bump() {
                    Some(close) if close.kind == TokenKind::Close => Ok(inner),
                    Some(other) => Err(other.unexpected("an operator or ')'")),
                    None => Err(RetryDelayError::UnexpectedEnd {
                        expected: format!("')' to close the '(' at position {}", token.position),
                    }),
                }
            }),
            _ => Err(token.unexpected(EXPECTED_OPERAND)),
        }
    }

    /// A variable, or a function call when the name is followed by `(`.
    fn name(&mut self, name: Token<'a>) -> Result<Expr, RetryDelayError> {
        let function = FUNCTIONS
            .iter()
            .find(|(function_name, _, _)| *function_name == name.text);
        let open = match self.peek() {
            Some(open) if open.kind == TokenKind::Open => open,
            _ => {
                return match function {
                    _ if name.text == VARIABLE_RETRIED => Ok(Expr::Retried),
                    Some(&(function_name, _, usage)) => Err(RetryDelayError::FunctionWithoutCall {
                        name: function_name,
                        position: name.position,
                        usage,
                    }),
                    None => Err(RetryDelayError::UnknownVariable {
                        name: name.text.to_owned(),
                        position: name.position,
                    }),
                };
            }
        };
        let Some(&(function_name, function, usage)) = function else {
            return Err(RetryDelayError::UnknownFunction {
                name: name.text.to_owned(),
                position: name.position,
            });
        };
        self.next += 1;
        let arguments = self.nested(open.position, |parser| parser.arguments(open.position))?;
        let found = arguments.len();
        let mut arguments = arguments.into_iter().map(Box::new);
        match (
            function,
            arguments.next(),
            arguments.next(),
            arguments.next(),
        ) {
            (Function::Unary(op), Some(x), None, None) => Ok(Expr::Unary(op, x)),
            (Function::Binary(op), Some(x), Some(y), None) => Ok(Expr::Binary(op, x, y)),
            (function, ..) => Err(RetryDelayError::WrongArity {
                name: function_name,
                position: name.position,
                expected: match function {
                    Function::Unary(_) => 1,
                    Function::Binary(_) => 2,
                },
                found,
                usage,
            }),
        }
    }

    /// The comma-separated arguments after an already consumed `(`, and the closing `)`.
    fn arguments(&mut self, open_position: usize) -> Result<Vec<Expr>, RetryDelayError> {
        let mut arguments = Vec::new();
        if self
            .peek()
            .is_some_and(|token| token.kind == TokenKind::Close)
        {
            self.next += 1;
            return Ok(arguments);
        }
        loop {
            arguments.push(self.expression()?);
            match self.bump() {
                Some(token) if token.kind == TokenKind::Comma => {}
                Some(token) if token.kind == TokenKind::Close => return Ok(arguments),
                Some(token) => return Err(token.unexpected("an operator, ',' or ')'")),
                None => {
                    return Err(RetryDelayError::UnexpectedEnd {
                        expected: format!(
                            "',' or ')' to close the '(' at position {open_position}"
                        ),
                    })
                }
            }
        }
    }
}

/// Delay requested by a destination's response headers, if any valid one is present:
/// `Retry-After`, `X-RateLimit-Reset`, `X-RateLimit-Reset-Requests`, `X-RateLimit-Reset-Tokens`
/// (names matched case-insensitively; `headers` maps names to their values).
///
/// Each value may be: a number of seconds (integer or decimal); an HTTP date (RFC 1123 etc., via
/// the httpdate crate) meaning "until then"; or a Go-style duration ("6m5s", "1h", "1.5s",
/// "300ms", "2us", "2µs", "10ns"; units ns, us, µs, ms, s, m, h; combinable). A plain integer
/// ≥ 1_000_000_000 is treated as a unix timestamp in seconds (a common X-RateLimit-Reset
/// convention) meaning "until then". Dates/timestamps in the past mean zero. When several valid
/// headers are present, the LARGEST delay wins (e.g. OpenAI sends both -Requests and -Tokens;
/// both limits must have reset). A delay larger than 1 day is ignored (returns None, so the
/// caller falls back to its own backoff). Invalid values are ignored. `now_ms` is the current
/// unix time in ms (passed in for testability).
pub fn retry_after(headers: &BTreeMap<String, Vec<String>>, now_ms: i64) -> Option<Duration> {
    let longest = headers
        .iter()
        .filter(|(name, _)| {
            RETRY_AFTER_HEADERS
                .iter()
                .any(|known| name.eq_ignore_ascii_case(known))
        })
        .flat_map(|(_, values)| values)
        .filter_map(|value| requested_delay(value, now_ms))
        .max()?;
    (longest <= MAX_RETRY_DELAY).then_some(longest)
}

/// One header value as a delay; huge values saturate rather than fail, so that they make
/// [`retry_after`] fall back instead of letting a smaller header win.
fn requested_delay(value: &str, now_ms: i64) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits, so parsing can only fail by overflow: a timestamp far in the future.
        let number = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(if number >= UNIX_TIMESTAMP_THRESHOLD_SECS {
            until(i128::from(number) * MILLIS_PER_SECOND, now_ms)
        } else {
            Duration::from_secs(number)
        });
    }
    if value.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return decimal_nanos(value, NANOS_PER_SECOND).map(saturating_duration);
    }
    if let Ok(nanos) = go_duration_nanos(value) {
        return Some(saturating_duration(nanos));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    // A date before 1970 is in the past.
    let date_ms = date.duration_since(UNIX_EPOCH).map_or(0, |since| {
        i128::try_from(since.as_millis()).unwrap_or(i128::MAX)
    });
    Some(until(date_ms, now_ms))
}

/// Time from `now_ms` until `target_ms`; zero when that is in the past.
fn until(target_ms: i128, now_ms: i64) -> Duration {
    let remaining = target_ms.saturating_sub(i128::from(now_ms)).max(0);
    Duration::from_millis(u64::try_from(remaining).unwrap_or(u64::MAX))
}

fn saturating_duration(nanos: u128) -> Duration {
    nanos_to_duration(nanos).unwrap_or(Duration::MAX)
}

fn nanos_to_duration(nanos: u128) -> Option<Duration> {
    let seconds = u64::try_from(nanos / NANOS_PER_SECOND).ok()?;
    let sub_second = u32::try_from(nanos % NANOS_PER_SECOND).ok()?;
    Some(Duration::new(seconds, sub_second))
}

/// Parses a Go-style duration: one or more `<number><unit>` components (`6m5s`, `1h30m`,
/// `1.5s`, `300ms`, `2us`, `2µs`, `10ns`; units ns, us, µs, ms, s, m, h). As in Go, numbers may be
/// decimals, the bare `0` is accepted, and units are case-sensitive. Unlike Go, signs are refused
/// (a delay cannot be negative) and so is surrounding whitespace (trim first). Public because
/// other parsers reuse it.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let nanos = go_duration_nanos(s)?;
    nanos_to_duration(nanos).ok_or_else(|| format!("duration '{s}' is too large"))
}

/// [`parse_go_duration`] in nanoseconds, saturating on overflow.
fn go_duration_nanos(s: &str) -> Result<u128, String> {
    if s.is_empty() {
        return Err("empty duration".to_owned());
    }
    if s == "0" {
        return Ok(0);
    }
    if s.starts_with('-') {
        return Err(format!("negative duration '{s}' is not allowed"));
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        if number.is_empty() {
            return Err(format!("duration '{s}' must start with a number"));
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        if unit.is_empty() {
            return Err(format!(
                "missing unit after '{number}' in duration '{s}' (use {GO_DURATION_UNIT_LIST})"
            ));
        }
        let Some(&(_, unit_nanos)) = GO_DURATION_UNITS.iter().find(|(name, _)| *name == unit)
        else {
            return Err(format!(
                "unknown unit '{unit}' in duration '{s}' (use {GO_DURATION_UNIT_LIST})"
            ));
        };
        let nanos = decimal_nanos(number, unit_nanos)
            .ok_or_else(|| format!("invalid number '{number}' in duration '{s}'"))?;
        total = total.saturating_add(nanos);
        rest = next;
    }
    Ok(total)
}

/// `text` (digits with at most one dot and at least one digit) times `unit_nanos`, in whole
/// nanoseconds (truncated), saturating on overflow.
fn decimal_nanos(text: &str, unit_nanos: u128) -> Option<u128> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let all_digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    let whole_value = whole.bytes().fold(0u128, |acc, digit| {
        acc.saturating_mul(10)
            .saturating_add(u128::from(digit - b'0'))
    });
    let (fraction_value, scale) = fraction
        .bytes()
        .take(MAX_FRACTION_DIGITS)
        .fold((0u128, 1u128), |(value, scale), digit| {
            (value * 10 + u128::from(digit - b'0'), scale * 10)
        });
    Some(
        whole_value
            .saturating_mul(unit_nanos)
            .saturating_add(fraction_value * unit_nanos / scale),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECOND_MS: i64 = 1_000;

    fn eval(source: &str, retried: u32) -> Result<Duration, RetryDelayError> {
        RetryDelayExpr::parse(source)
            .unwrap_or_else(|e| panic!("{source:?}: {e}"))
            .eval(retried)
    }

    fn ms(source: &str, retried: u32) -> u128 {
        eval(source, retried)
            .unwrap_or_else(|e| panic!("{source:?}: {e}"))
            .as_millis()
    }

    fn headers(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<String>> {
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, value) in pairs {
            map.entry((*name).to_owned())
                .or_default()
                .push((*value).to_owned());
        }
        map
    }

    #[test]
    fn default_backoff_follows_the_documented_curve() {
        for (n, expected_secs) in [(1, 12.182), (2, 148.413), (3, 1808.042), (4, 22026.466)] {
            let got = default_backoff(n).as_secs_f64();
            assert!((got - expected_secs).abs() < 0.01, "n={n}: {got}");
        }
        for n in [5, 6, 1000, u32::MAX] {
            assert_eq!(default_backoff(n), MAX_RETRY_DELAY, "n={n}");
        }
        assert_eq!(MAX_RETRY_DELAY, Duration::from_secs(86_400));
    }

    #[test]
    fn documented_examples_evaluate() {
        for (source, expected) in [
            ("1000", [1000, 1000, 1000]),
            ("1000 * (1 + retried)", [1000, 2000, 4000]),
            ("pow(2, retried) * 1000", [1000, 2000, 8000]),
            ("max(1000, pow(2, retried) * 100)", [1000, 1000, 1000]),
            ("2000 * retried", [0, 2000, 6000]),
        ] {
            for (retried, want) in [0, 1, 3].into_iter().zip(expected) {
                assert_eq!(ms(source, retried), want, "{source} @ {retried}");
            }
        }
        assert_eq!(ms("max(1000, pow(2, retried) * 100)", 5), 3200);
    }

    #[test]
    fn source_is_kept_verbatim() {
        let source = "  2000 *retried ";
        assert_eq!(RetryDelayExpr::parse(source).unwrap().source(), source);
    }

    #[test]
    fn precedence_and_associativity() {
        for (source, want) in [
            ("10-2-3", 5),
            ("2*3+4", 10),
            ("2+3*4", 14),
            ("(1+2)*3", 9),
            ("100/10/2", 5),
            ("20 + -2*3", 14),
            ("20 - -2", 22),
            ("-2*-3", 6),
            ("--5", 5),
            ("2.5 * 2", 5),
            (".5 * 4", 2),
            ("\t1\n+\r2 ", 3),
        ] {
            assert_eq!(ms(source, 0), want, "{source}");
        }
        assert_eq!(eval("-2*3", 0), Ok(Duration::ZERO));
        assert_eq!(eval("1.5", 0), Ok(Duration::from_micros(1500)));
    }

    #[test]
    fn every_function() {
        for (source, want) in [
            ("pow(2, 10)", 1024),
            ("exp(0)", 1),
            ("floor(exp(2))", 7),
            ("sqrt(144)", 12),
            ("abs(-7)", 7),
            ("floor(2.7)", 2),
            ("ceil(2.1)", 3),
            ("round(2.5)", 3),
            ("round(2.4)", 2),
            ("min(3, 8)", 3),
            ("max(3, 8)", 8),
            ("max(min(retried, 4), 1) * 10", 40),
        ] {
            assert_eq!(ms(source, 7), want, "{source}");
        }
    }

    #[test]
    fn evaluation_limits() {
        assert_eq!(
            eval("1000 / retried", 0),
            Err(RetryDelayError::DivisionByZero { retried: 0 })
        );
        assert_eq!(ms("1000 / retried", 4), 250);
        assert_eq!(
            eval("min(1 / 0, 5)", 2),
            Err(RetryDelayError::DivisionByZero { retried: 2 })
        );
        assert_eq!(
            eval("exp(1000)", 1),
            Err(RetryDelayError::NotFinite { retried: 1 })
        );
        assert_eq!(
            eval("sqrt(0 - 1)", 0),
            Err(RetryDelayError::NotFinite { retried: 0 })
        );
        assert_eq!(eval("0 - 5000", 0), Ok(Duration::ZERO));
        assert_eq!(eval("pow(10, 20)", 0), Ok(MAX_RETRY_DELAY));
        assert_eq!(eval("pow(2, retried) * 1000", 30), Ok(MAX_RETRY_DELAY));
        assert_eq!(eval("86400000", 0), Ok(MAX_RETRY_DELAY));
        assert_eq!(ms("86399999", 0), 86_399_999);
        assert!(eval("1000 * retried", u32::MAX).is_ok());
    }

    #[test]
    fn parse_errors_are_refused_with_precise_text() {
        let err = |source: &str| RetryDelayExpr::parse(source).expect_err(source).to_string();
        assert_eq!(err(""), "empty expression");
        assert_eq!(err("   "), "empty expression");
        assert_eq!(
            err("1 +"),
            "unexpected end of expression, expected a number, 'retried', a function call or '('"
        );
        assert_eq!(
            err("(1"),
            "unexpected end of expression, expected ')' to close the '(' at position 1"
        );
        assert_eq!(
            err("1)"),
            "unexpected ')' at position 2, expected an operator or the end of the expression"
        );
        assert_eq!(
            err("1 2"),
            "unexpected '2' at position 3, expected an operator or the end of the expression"
        );
        assert!(err("foo(1)").starts_with("unknown function 'foo' at position 1"));
        assert!(err("2 * foo(1)").starts_with("unknown function 'foo' at position 5"));
        assert_eq!(
            err("pow(1)"),
            "function 'pow' at position 1 takes 2 arguments, got 1 (usage: pow(x, y))"
        );
        assert_eq!(
            err("exp(1, 2)"),
            "function 'exp' at position 1 takes 1 argument, got 2 (usage: exp(x))"
        );
        assert!(err("max()").contains("takes 2 arguments, got 0"));
        assert_eq!(
            err("retried2"),
            "unknown variable 'retried2' at position 1 (the only variable is 'retried')"
        );
        assert!(err("Retried").starts_with("unknown variable 'Retried'"));
        assert!(err("POW(2, 3)").starts_with("unknown function 'POW'"));
        assert_eq!(
            err("pow + 1"),
            "function 'pow' at position 1 must be called as pow(x, y)"
        );
        assert_eq!(err("1 ^ 2"), "unexpected character '^' at position 3");
        assert_eq!(err("1.2.3"), "invalid number '1.2.3' at position 1");
        assert!(err("max(1, 2").contains("',' or ')' to close the '(' at position 4"));
        assert!(err("max(1,)").starts_with("unexpected ')' at position 7"));
        assert!(err("+1").starts_with("unexpected '+' at position 1"));
        assert!(err("é + 1").starts_with("unexpected character 'é' at position 1"));
        assert!(err("1 + é").starts_with("unexpected character 'é' at position 5"));
        assert!(err("()").starts_with("unexpected ')' at position 2"));
    }

    #[test]
    fn pathological_input_is_refused() {
        assert_eq!(
            RetryDelayExpr::parse(&"(".repeat(10_000)),
            Err(RetryDelayError::TooLong {
                max: MAX_EXPRESSION_CHARS
            })
        );
        let long = format!("1{}", " + 1".repeat(MAX_EXPRESSION_CHARS));
        assert!(matches!(
            RetryDelayExpr::parse(&long),
            Err(RetryDelayError::TooLong { .. })
        ));
        let at_limit = format!("1{}", "+1".repeat((MAX_EXPRESSION_CHARS - 1) / 2));
        assert_eq!(at_limit.chars().count(), MAX_EXPRESSION_CHARS - 1);
        assert_eq!(
            ms(&at_limit, 0),
            u128::try_from(MAX_EXPRESSION_CHARS / 2).unwrap()
        );

        let nested = |depth: usize| format!("{}1{}", "(".repeat(depth), ")".repeat(depth));
        assert_eq!(ms(&nested(MAX_NESTING_DEPTH), 0), 1);
        assert_eq!(
            RetryDelayExpr::parse(&nested(MAX_NESTING_DEPTH + 1)),
            Err(RetryDelayError::TooDeep {
                max: MAX_NESTING_DEPTH,
                position: MAX_NESTING_DEPTH + 1
            })
        );
        assert!(matches!(
            RetryDelayExpr::parse(&format!("{}1", "-".repeat(500))),
            Err(RetryDelayError::TooDeep { .. })
        ));
        let calls = format!("{}1{}", "abs(".repeat(200), ")".repeat(200));
        assert!(matches!(
            RetryDelayExpr::parse(&calls),
            Err(RetryDelayError::TooDeep { .. })
        ));
    }

    #[test]
    fn retry_after_reads_each_form() {
        let now = 1_700_000_000 * SECOND_MS;
        let one = |name: &str, value: &str| retry_after(&headers(&[(name, value)]), now);
        assert_eq!(one("Retry-After", "120"), Some(Duration::from_secs(120)));
        assert_eq!(one("Retry-After", "0"), Some(Duration::ZERO));
        assert_eq!(
            one("Retry-After", " 1.5 "),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            one("x-ratelimit-reset", "6m5s"),
            Some(Duration::from_secs(365))
        );
        assert_eq!(
            one("X-RateLimit-Reset-Requests", "300ms"),
            Some(Duration::from_millis(300))
        );
        assert_eq!(
            one("X-RATELIMIT-RESET-TOKENS", "2µs"),
            Some(Duration::from_micros(2))
        );
        // 1_700_000_000 is Tue, 14 Nov 2023 22:13:20 GMT.
        assert_eq!(
            one("Retry-After", "Tue, 14 Nov 2023 22:15:00 GMT"),
            Some(Duration::from_secs(100))
        );
        assert_eq!(
            one("retry-after", "Tuesday, 14-Nov-23 22:13:30 GMT"),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            one("x-ratelimit-reset", "1700000042"),
            Some(Duration::from_secs(42))
        );
        assert_eq!(one("Retry-After", "1"), Some(Duration::from_secs(1)));
        assert_eq!(one("Retry-After", "999999999"), None, "31 years of seconds");
    }

    #[test]
    fn retry_after_past_times_mean_now() {
        let now = 1_700_000_000 * SECOND_MS;
        let one = |value: &str| retry_after(&headers(&[("Retry-After", value)]), now);
        assert_eq!(one("Tue, 14 Nov 2023 22:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(one("Thu, 01 Jan 1970 00:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(one("1600000000"), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_largest_wins_and_over_a_day_falls_back() {
        let now = 0;
        let map = headers(&[
            ("X-RateLimit-Reset-Requests", "1s"),
            ("X-RateLimit-Reset-Tokens", "6m0s"),
            ("Retry-After", "20"),
            ("Content-Type", "3600"),
        ]);
        assert_eq!(retry_after(&map, now), Some(Duration::from_secs(360)));
        let repeated = headers(&[("Retry-After", "5"), ("Retry-After", "7")]);
        assert_eq!(retry_after(&repeated, now), Some(Duration::from_secs(7)));

        let too_long = headers(&[("Retry-After", "1s"), ("X-RateLimit-Reset", "25h")]);
        assert_eq!(retry_after(&too_long, now), None);
        let day = headers(&[("Retry-After", "86400")]);
        assert_eq!(retry_after(&day, now), Some(MAX_RETRY_DELAY));
        let huge = headers(&[("Retry-After", "1"), ("X-RateLimit-Reset", &"9".repeat(60))]);
        assert_eq!(retry_after(&huge, now), None);
        let huge_decimal = headers(&[("Retry-After", "1"), ("X-RateLimit-Reset", "1e400")]);
        assert_eq!(
            retry_after(&huge_decimal, now),
            Some(Duration::from_secs(1)),
            "not a number at all, so ignored"
        );
    }

    #[test]
    fn retry_after_ignores_garbage_and_other_headers() {
        let now = 0;
        assert_eq!(retry_after(&BTreeMap::new(), now), None);
        for garbage in [
            "",
            "soon",
            "-5",
            "5x",
            "1.2.3",
            "+5",
            "NaN",
            "inf",
            "Tue, 99 Nov",
        ] {
            assert_eq!(
                retry_after(&headers(&[("Retry-After", garbage)]), now),
                None,
                "{garbage:?}"
            );
        }
        let mixed = headers(&[("Retry-After", "later"), ("X-RateLimit-Reset", "3")]);
        assert_eq!(retry_after(&mixed, now), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(&headers(&[("X-Retry-After", "3")]), now), None);
    }

    #[test]
    fn go_durations() {
        for (text, want) in [
            ("6m5s", Duration::from_secs(365)),
            ("1h30m", Duration::from_secs(5400)),
            ("1h", Duration::from_secs(3600)),
            ("1.5s", Duration::from_millis(1500)),
            ("300ms", Duration::from_millis(300)),
            ("2us", Duration::from_micros(2)),
            ("2µs", Duration::from_micros(2)),
            ("2\u{3bc}s", Duration::from_micros(2)),
            ("10ns", Duration::from_nanos(10)),
            ("1.5h", Duration::from_secs(5400)),
            (".5s", Duration::from_millis(500)),
            ("0.000000001s", Duration::from_nanos(1)),
            ("1h1m1s1ms1us1ns", Duration::new(3661, 1_001_001)),
            ("0", Duration::ZERO),
        ] {
            assert_eq!(parse_go_duration(text), Ok(want), "{text}");
        }
        for bad in [
            "", "5", "5x", "-1s", "+1s", "s", ".s", "1.2.3s", "1H", "1d", " 1s", "1s ", "1h 30m",
        ] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(parse_go_duration(""), Err("empty duration".to_owned()));
        assert_eq!(
            parse_go_duration("5"),
            Err(
                "missing unit after '5' in duration '5' (use ns, us, µs, ms, s, m or h)".to_owned()
            )
        );
        assert_eq!(
            parse_go_duration("5x"),
            Err("unknown unit 'x' in duration '5x' (use ns, us, µs, ms, s, m or h)".to_owned())
        );
        assert_eq!(
            parse_go_duration("-1s"),
            Err("negative duration '-1s' is not allowed".to_owned())
        );
        let too_large = format!("{}h", "9".repeat(40));
        assert_eq!(
            parse_go_duration(&too_large),
            Err(format!("duration '{too_large}' is too large"))
        );
    }

    fn expression_alphabet() -> impl Strategy<Value = String> {
        "[0-9a-z().,+*/ -]{0,40}"
    }

    fn retry_header_map() -> impl Strategy<Value = BTreeMap<String, Vec<String>>> {
        let name = prop_oneof![
            Just("Retry-After".to_owned()),
            Just("x-ratelimit-reset".to_owned()),
            Just("X-RateLimit-Reset-Requests".to_owned()),
            Just("X-RATELIMIT-RESET-TOKENS".to_owned()),
            "\\PC{0,20}",
        ];
        let value = prop_oneof!["\\PC{0,40}", "[0-9.hmsunµ:, a-zA-Z-]{0,40}"];
        proptest::collection::btree_map(name, proptest::collection::vec(value, 0..3), 0..5)
    }

    proptest! {
        #[test]
        fn parse_and_eval_never_panic(source in "\\PC{0,40}", retried in any::<u32>()) {
            if let Ok(expr) = RetryDelayExpr::parse(&source) {
                let _ = expr.eval(retried);
            }
        }

        #[test]
        fn parse_and_eval_never_panic_on_the_expression_alphabet(
            source in expression_alphabet(),
            retried in any::<u32>(),
        ) {
            if let Ok(expr) = RetryDelayExpr::parse(&source) {
                prop_assert_eq!(expr.source(), source.as_str());
                if let Ok(delay) = expr.eval(retried) {
                    prop_assert!(delay <= MAX_RETRY_DELAY);
                }
            }
        }

        #[test]
        fn go_duration_parser_never_panics(s in "\\PC{0,40}", t in "[0-9.hmsunµ]{0,40}") {
            let _ = parse_go_duration(&s);
            let _ = parse_go_duration(&t);
        }

        #[test]
        fn retry_after_never_panics(map in retry_header_map(), now_ms in any::<i64>()) {
            if let Some(delay) = retry_after(&map, now_ms) {
                prop_assert!(delay <= MAX_RETRY_DELAY);
            }
        }

        #[test]
        fn linear_expressions_evaluate_exactly(
            a in 0u32..10_000,
            b in 0u32..10_000,
            r in 0u32..100_000,
        ) {
            let expr = RetryDelayExpr::parse(&format!("{a} + {b} * retried")).unwrap();
            let want = (u64::from(a) + u64::from(b) * u64::from(r)).min(SECONDS_PER_DAY * 1_000);
            prop_assert_eq!(expr.eval(r), Ok(Duration::from_millis(want)));
        }
    }
}
