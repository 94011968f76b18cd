pub struct SpiffeId; pub struct TrustDomain; pub struct SpiffeIdError;
