// The browser client of the hub is served here.
export {};
